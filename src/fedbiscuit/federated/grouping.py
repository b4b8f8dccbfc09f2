"""FedBiscuit's client grouping: K disjoint clusters whose sizes differ by at most one.

Input: loss[i][k], client i's held-out loss under selector k. Three assignments:
- ``optimal_assignment``: minimum total loss subject to balance, exactly: the Hungarian algorithm over each
  selector replicated into floor(n/K) slots plus one optional slot, of which exactly n mod K are filled.
- ``greedy_assignment``: the reference code's rule, step by step: the most asked selector keeps the first of
  its askers in a shuffled client order.
- ``greedy_assignment(..., keep="lowest_loss")``: the same rounds, but the most asked selector keeps the askers
  it fits best (lowest loss); not the reference's rule (config name ``greedy_lowest_loss``).

``balanced_kmeans`` groups clients by the direction of their updates instead (``grouping: updates``), as
clustered federated learning does (Sattler et al. 2020; Ghosh et al. 2020), with the same balance.
"""

from __future__ import annotations

import math
import random

import numpy as np
from scipy.optimize import linear_sum_assignment


def _capacities(n: int, k: int) -> tuple[int, int]:
    return n // k, n % k  # every cluster gets `base`; `extra` of them get one more


def optimal_assignment(loss: np.ndarray) -> list[int]:
    """Cluster index per client minimising total loss, cluster sizes floor(n/K) or ceil(n/K)."""
    loss = np.asarray(loss, dtype=np.float64)
    n, k = loss.shape
    base, extra = _capacities(n, k)
    # Columns: `base` mandatory slots per cluster, then one optional slot per cluster. Exactly `extra` optional
    # slots may be used; dummy rows (n + ... ) absorb the rest at zero cost so the matrix is square.
    mandatory = np.repeat(loss, base, axis=1) if base else np.zeros((n, 0))
    optional = loss if extra else np.zeros((n, 0))
    cost = np.concatenate([mandatory, optional], axis=1)
    unused = cost.shape[1] - n  # optional slots that must stay empty
    if unused:
        big = float(np.abs(loss).sum() + 1.0) * (n + 1)
        # dummy rows may take only optional slots; a mandatory slot left to a dummy costs `big`
        dummy = np.concatenate(
            [np.full((unused, mandatory.shape[1]), big), np.zeros((unused, optional.shape[1]))], axis=1
        )
        cost = np.concatenate([cost, dummy], axis=0)
    rows, cols = linear_sum_assignment(cost)
    out = [-1] * n
    for r, c in zip(rows, cols, strict=True):
        if r < n:
            out[r] = int(c // base if c < mandatory.shape[1] else c - mandatory.shape[1])
    return out


def greedy_assignment(loss: np.ndarray, seed: int = 0, keep: str = "order") -> list[int]:
    """Clients are shuffled; each unplaced client asks for its best open selector; the most asked selector
    keeps up to ceil(unplaced / open) of its askers and closes; repeat until every client is placed.

    ``keep="order"`` (the reference rule) keeps the first askers in the shuffled order; ``keep="lowest_loss"``
    keeps those with the lowest loss under that selector.
    """
    loss = np.asarray(loss, dtype=np.float64)
    n, k = loss.shape
    order = list(range(n))
    random.Random(f"greedy:{seed}").shuffle(order)
    out = [-1] * n
    unplaced, open_ = order, list(range(k))
    while unplaced:
        quota = math.ceil(len(unplaced) / len(open_))
        asks: dict[int, list[int]] = {j: [] for j in open_}
        for i in unplaced:  # in the shuffled order, so each list of askers is too
            asks[min(open_, key=lambda j: (loss[i, j], j))].append(i)
        chosen = max(open_, key=lambda j: (len(asks[j]), -j))
        askers = asks[chosen]
        if keep == "lowest_loss":
            askers = sorted(askers, key=lambda i: loss[i, chosen])
        kept = unplaced if len(open_) == 1 else askers[:quota]  # the last selector takes everyone left
        for i in kept:
            out[i] = chosen
        unplaced = [i for i in unplaced if out[i] < 0]
        open_.remove(chosen)
    return out


def assign(loss: np.ndarray, method: str, seed: int = 0) -> list[int]:
    if method == "optimal":
        return optimal_assignment(loss)
    if method == "greedy":
        return greedy_assignment(loss, seed)
    if method == "greedy_lowest_loss":
        return greedy_assignment(loss, seed, keep="lowest_loss")
    raise ValueError(f"unknown assignment {method!r}: use optimal, greedy or greedy_lowest_loss")


def balanced_kmeans(
    x: np.ndarray, k: int, seed: int = 0, restarts: int = 8, iters: int = 50
) -> tuple[list[int], np.ndarray]:
    """Rows of ``x`` (clients' update directions) into k clusters of sizes floor(n/k) or ceil(n/k) by cosine
    similarity: spherical k-means whose assignment step is optimal_assignment on -cos(row, centroid). The best
    of ``restarts`` farthest-point seedings (highest total similarity to the own centroid). Returns the cluster
    of each row and the k unit centroids. (scikit-learn's KMeans has no size constraint and is not a
    dependency; this is 20 lines on the assignment the loss grouping already uses.)"""
    x = np.asarray(x, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = len(x)
    rng = np.random.default_rng(seed)
    best: tuple[float, list[int], np.ndarray] | None = None

    def centres(idx: list[int]) -> np.ndarray:
        c = np.stack([x[[i for i in range(n) if idx[i] == j]].sum(0) for j in range(k)])
        return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)

    firsts = rng.permutation(n)[: max(1, restarts)]
    for first in firsts:
        # farthest-point seeding from a different row each restart (random balanced starts got stuck in local
        # optima even on 6 clearly separated rows): each next centre is the row least similar to those chosen
        chosen = [int(first)]
        while len(chosen) < k:
            chosen.append(int(np.argmin((x @ x[chosen].T).max(1))))
        idx = optimal_assignment(-x @ x[chosen].T)
        for _ in range(iters):
            new = optimal_assignment(-x @ centres(idx).T)
            if new == idx:
                break
            idx = new
        centroids = centres(idx)
        score = float(sum(x[i] @ centroids[idx[i]] for i in range(n)))
        if best is None or score > best[0] + 1e-12:
            best = (score, idx, centroids)
    return best[1], best[2]
