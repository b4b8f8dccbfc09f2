import itertools
from collections import Counter

import numpy as np
import pytest

from fedbiscuit.federated.grouping import greedy_assignment, optimal_assignment


def _balanced(assignment, k):
    sizes = Counter(assignment)
    return (
        len(assignment) == sum(sizes.values()) and max(sizes.values()) - min(sizes[j] for j in range(k)) <= 1
    )


def _brute_force(loss):
    n, k = loss.shape
    best = None
    for combo in itertools.product(range(k), repeat=n):
        if _balanced(list(combo), k):
            total = sum(loss[i, c] for i, c in enumerate(combo))
            best = total if best is None else min(best, total)
    return best


@pytest.mark.parametrize(("n", "k"), [(6, 2), (7, 3), (5, 5), (8, 3), (4, 1)])
def test_optimal_is_balanced_and_minimal(n, k):
    rng = np.random.default_rng(n * 10 + k)
    for _ in range(5):
        loss = rng.random((n, k))
        a = optimal_assignment(loss)
        assert _balanced(a, k)
        assert sum(loss[i, c] for i, c in enumerate(a)) == pytest.approx(_brute_force(loss))


@pytest.mark.parametrize(("n", "k"), [(6, 2), (7, 3), (53, 5), (16, 2), (3, 3)])
def test_greedy_is_balanced_disjoint_and_never_beats_optimal(n, k):
    rng = np.random.default_rng(n + k)
    loss = rng.random((n, k))
    g = greedy_assignment(loss, seed=1)
    assert _balanced(g, k) and all(0 <= c < k for c in g)
    o = optimal_assignment(loss)
    assert sum(loss[i, c] for i, c in enumerate(o)) <= sum(loss[i, c] for i, c in enumerate(g)) + 1e-9


def test_greedy_follows_the_paper_rule_on_a_clear_case():
    # clients 0-2 all prefer selector 0, client 3 prefers selector 1: selector 0 is most asked and keeps
    # ceil(4/2) = 2 of them (lowest loss first); the third moves to its next choice.
    loss = np.array([[0.1, 0.9], [0.2, 0.8], [0.3, 0.35], [0.9, 0.1]])
    assert greedy_assignment(loss) == [0, 0, 1, 1]
    assert optimal_assignment(loss) == [0, 0, 1, 1]
