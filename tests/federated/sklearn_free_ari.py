"""Adjusted Rand index (Hubert & Arabie), small enough to keep scikit-learn out of the test dependencies."""

from collections import Counter
from math import comb


def adjusted_rand_index(a, b) -> float:
    n = len(a)
    pairs = Counter(zip(a, b, strict=True))
    sum_ij = sum(comb(v, 2) for v in pairs.values())
    sum_a = sum(comb(v, 2) for v in Counter(a).values())
    sum_b = sum(comb(v, 2) for v in Counter(b).values())
    expected = sum_a * sum_b / comb(n, 2)
    maximum = (sum_a + sum_b) / 2
    return 1.0 if maximum == expected else (sum_ij - expected) / (maximum - expected)
