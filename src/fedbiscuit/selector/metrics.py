"""Agreement of a selector with human labels: overall and per client, each order and both averaged, Brier;
and how evenly it serves the clients (fairness)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

import numpy as np
import torch

from ..data.pairs import Comparison
from .encoding import EncodedPair


def _summary(labels: torch.Tensor, p_ab: torch.Tensor, p_ba: torch.Tensor | None) -> dict:
    """Agreement counts only pairs with a decided label; Brier uses the soft label of every pair."""
    decided = labels != 0.5
    hard = labels > 0.5
    out = {
        "n": int(decided.sum()),
        "agreement_ab": _agree(p_ab, hard, decided),
        "brier_ab": _brier(p_ab, labels),
    }
    if p_ba is not None:
        p_a_from_ba = 1.0 - p_ba  # P(a better) read off the swapped presentation
        avg = swap_average(p_ab, p_ba)
        out |= {
            "agreement_ba": _agree(p_a_from_ba, hard, decided),
            "agreement": _agree(avg, hard, decided),
            "brier": _brier(avg, labels),
            # how much the answer depends on where a response is shown: 0 means none
            "position_bias": float(((p_ab + p_ba) / 2 - 0.5).mean()) if len(labels) else float("nan"),
        }
    else:
        out |= {"agreement": out["agreement_ab"], "brier": out["brier_ab"]}
    out["ci95"] = list(wilson_interval(out["agreement"] * out["n"], out["n"]))
    return out


def swap_average(p_ab: torch.Tensor, p_ba: torch.Tensor) -> torch.Tensor:
    """P(a better) from both presentations: as shown (a, b), and 1 - P(b better) as shown (b, a)."""
    return (p_ab + (1.0 - p_ba)) / 2


def _agree(p: torch.Tensor, hard: torch.Tensor, decided: torch.Tensor) -> float:
    """Share of decided pairs where the selector sides with people; an exact 0.5 (no preference) counts half."""
    if not decided.any():
        return float("nan")
    score = ((p > 0.5) == hard).float()
    score = torch.where(p == 0.5, torch.full_like(score, 0.5), score)
    return float(score[decided].mean())


def _brier(p: torch.Tensor, labels: torch.Tensor) -> float:
    return float(((p - labels) ** 2).mean()) if len(labels) else float("nan")


MIN_CLIENT_PAIRS = 5  # eval.min_client_pairs' default (config.EvalConfig says why)


def agreement_report(
    pairs: list[EncodedPair],
    p_ab: torch.Tensor,
    p_ba: torch.Tensor | None,
    min_client_pairs: int = MIN_CLIENT_PAIRS,
) -> dict:
    """{"overall": {...}, "clients": {name: {...}}, "fairness": {...}}: agreement, per-order agreement, Brier
    and bias, overall and per client, and the spread of the per-client agreement (client_fairness)."""
    labels = torch.tensor([p.label for p in pairs], dtype=torch.float32)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        groups[p.client].append(i)
    clients = {}
    for name, idx in sorted(groups.items()):
        t = torch.tensor(idx)
        clients[name] = _summary(labels[t], p_ab[t], None if p_ba is None else p_ba[t])
    return {
        "overall": _summary(labels, p_ab, p_ba),
        "clients": clients,
        "fairness": client_fairness(clients, min_client_pairs),
    }


def client_fairness(clients: dict[str, dict], min_pairs: int = MIN_CLIENT_PAIRS) -> dict:
    """How evenly a selector serves people: statistics of the per-client agreement, each client counted once
    whatever its number of pairs (the overall agreement weighs clients by their pairs instead).

    - ``mean``: the mean over clients; ``worst`` / ``best``: the lowest / highest client (``worst_client``
      names it; ties go to the first name);
    - ``p10``: the 10th percentile, linearly interpolated between clients (numpy's default);
    - ``spread``: best minus worst, in agreement units; ``std``: the standard deviation over clients (ddof 0).

    Only clients with at least ``min_pairs`` decided pairs count (``clients``); the others are ``left_out``.
    """
    counted = {name: c["agreement"] for name, c in clients.items() if c["n"] >= min_pairs}
    out: dict = {"clients": len(counted), "left_out": len(clients) - len(counted), "min_pairs": min_pairs}
    if not counted:
        nan = float("nan")
        return (
            out
            | dict.fromkeys(("mean", "worst", "p10", "best", "spread", "std"), nan)
            | {"worst_client": None}
        )
    values = np.array(list(counted.values()), dtype=np.float64)
    worst_client = min(counted, key=lambda c: (counted[c], c))
    return out | {
        "mean": float(values.mean()),
        "worst": float(values.min()),
        "worst_client": worst_client,
        "p10": float(np.percentile(values, 10)),
        "best": float(values.max()),
        "spread": float(values.max() - values.min()),
        "std": float(values.std()),
    }


# ------------------------------------------------------------------------------------ intervals and tests


def pair_correct(pairs: list[EncodedPair], p_ab: torch.Tensor, p_ba: torch.Tensor | None) -> torch.Tensor:
    """Per decided pair: 1 if the (swap-averaged) selector sides with people, 0 if not, 0.5 for exactly 0.5."""
    labels = torch.tensor([p.label for p in pairs], dtype=torch.float32)
    p = p_ab if p_ba is None else swap_average(p_ab, p_ba)
    score = ((p > 0.5) == (labels > 0.5)).float()
    score = torch.where(p == 0.5, torch.full_like(score, 0.5), score)
    return score[labels != 0.5]


def pair_outcomes(
    pairs: list[EncodedPair], p_ab: torch.Tensor, p_ba: torch.Tensor | None
) -> list[float | None]:
    """pair_correct for every pair in order, None for a tie (no label to agree with): what an evaluation logs
    so that two evaluations of a run can be compared pair by pair later (federated runs' paired test)."""
    decided = iter(pair_correct(pairs, p_ab, p_ba).tolist())
    return [None if p.label == 0.5 else next(decided) for p in pairs]


def paired_outcomes(before: list[float | None], after: list[float | None], seed: int = 0) -> dict | None:
    """paired_comparison on the pairs both lists judged (not None), or None if they share none."""
    both = [(b, a) for b, a in zip(before, after, strict=True) if b is not None and a is not None]
    if not both:
        return None
    b, a = (torch.tensor(x, dtype=torch.float32) for x in zip(*both, strict=True))
    return paired_comparison(b, a, seed=seed)


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sensible near 0 and 1, unlike the normal approximation)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return centre - half, centre + half


def length_rule(pairs: Iterable[Comparison], count: Callable[[str], int]) -> dict:
    """Agreement of "the longer answer is better" with people on the decided pairs, by ``count`` (tokens of the
    whole answer): the reference a selector that learned only length would reach (HH raters prefer the longer
    answer more often than not, so a selector's gain over chance is partly this). Equal lengths count half."""
    scores = []
    for p in pairs:
        if p.label == 0.5:
            continue
        a, b = count(p.response_a), count(p.response_b)
        scores.append(0.5 if a == b else float((a > b) == (p.label > 0.5)))
    n = len(scores)
    agreement = sum(scores) / n if n else float("nan")
    return {"agreement": agreement, "n": n, "ci95": list(wilson_interval(sum(scores), n))}


def paired_comparison(before: torch.Tensor, after: torch.Tensor, seed: int = 0, draws: int = 10_000) -> dict:
    """Two selectors judged on the same pairs: difference in agreement, its 95% paired-bootstrap interval, and
    McNemar's exact test on the pairs whose outcome changed.

    Outcomes are 1, 0 or 0.5 (a selector exactly undecided: in bf16 a purely position-biased selector, equally
    sure of "A" in both orders, averages to exactly 0.5, so these are common). A pair "gained" when its outcome
    went up (0 -> 1, 0 -> 0.5, 0.5 -> 1) and "lost" when it went down: McNemar's test is the sign test of the
    per-pair differences, and this is that sign test with half-credit outcomes. (Counting only exact 1s, as
    this did before, leaves out 0 <-> 0.5 changes and can point the other way from the mean difference.)

    ``permutation_p`` is the paired randomization test of the mean difference (each pair's difference keeps or
    flips its sign at random; the share of draws whose mean is at least as far from zero, the observed one
    counted). For one outcome per pair it agrees closely with McNemar's; for per-pair means over several seeds
    (differences in steps of 1/seeds) it is the test to read: the sign test there counts a pair whose mean
    moved by 0.25 as much as one that moved by 1, and so can miss a difference the bootstrap interval shows."""
    from scipy.stats import binomtest

    if before.shape != after.shape or before.numel() == 0:
        raise ValueError("paired comparison needs the same, non-empty set of pairs for both selectors")
    diff = after - before
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, diff.numel(), (draws, diff.numel()), generator=gen)
    boot = diff[idx].mean(1)
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975])).tolist()
    gained, lost = int((diff > 0).sum()), int((diff < 0).sum())
    p = binomtest(gained, gained + lost, 0.5).pvalue if gained + lost else 1.0
    observed = float(diff.mean().abs())
    extreme = 0
    for start in range(0, draws, 1000):  # in blocks: a draw is a row of n signs
        signs = torch.randint(0, 2, (min(1000, draws - start), diff.numel()), generator=gen) * 2 - 1
        flipped = (signs.to(diff.dtype) * diff).mean(1).abs()
        # a tolerance, so draws equal to the observed mean up to rounding count as "at least as far"
        extreme += int((flipped >= observed - 1e-6 * max(1.0, observed)).sum())
    perm_p = (extreme + 1) / (draws + 1)
    return {
        "n": int(diff.numel()),
        "before": float(before.mean()),
        "after": float(after.mean()),
        "difference": float(diff.mean()),
        "ci95": [lo, hi],
        "gained": gained,
        "lost": lost,
        "mcnemar_p": float(p),
        "permutation_p": float(perm_p),
    }
