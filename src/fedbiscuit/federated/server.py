"""What the server does: sample clients, check what they return, and aggregate adapters.

Plain functions on plain data (adapter states are dicts of CPU tensors); no transport, no model.
"""

from __future__ import annotations

import math
import random

import torch

from ..models.adapters import AdapterMismatchError, AdapterState, check_state
from .client import TrainReply


def sample_clients(names: list[str], k: int, seed: int, round_: int) -> list[str]:
    """``k`` clients uniformly without replacement; a function of (seed, round) only, so resume replays it."""
    rng = random.Random(f"sample:{seed}:{round_}")
    return sorted(rng.sample(names, min(k, len(names))), key=names.index)


def reject_reason(reply: object, reference: AdapterState) -> str | None:
    """Why an update must be left out of the aggregate, or None if it is usable."""
    if not isinstance(reply, TrainReply):
        return f"not a training reply ({type(reply).__name__})"
    try:
        check_state(reference, reply.state, "update")
    except AdapterMismatchError as err:
        return str(err)
    if not (isinstance(reply.num_samples, int) and reply.num_samples > 0):
        return f"bad sample count {reply.num_samples!r}"
    loss = reply.metrics.get("loss", 0.0)
    if not isinstance(loss, float | int) or not math.isfinite(loss):
        return f"non-finite training loss {loss!r}"  # accuracy may be NaN: a batch of ties has none
    return None


def fedavg(states: list[AdapterState], weights: list[float] | None = None) -> AdapterState:
    """Weighted average of adapter states (uniform when ``weights`` is None), accumulated in float64."""
    if not states:
        raise ValueError("nothing to average")
    w = torch.tensor(weights if weights is not None else [1.0] * len(states), dtype=torch.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"bad aggregation weights {w.tolist()}")
    w = w / w.sum()
    out = {}
    for key, ref in states[0].items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for wi, s in zip(w, states, strict=True):
            acc += wi * s[key].to(torch.float64)
        out[key] = acc.to(ref.dtype)
    return out


def delta_update(
    global_state: AdapterState, states: list[AdapterState], weights: list[float]
) -> AdapterState:
    """The FedBiscuit reference code's rule: theta += sum_i w_i * (theta_i - theta).

    The reference sets w_i = 1/N (N = all clients), or, weighting by samples, n_i / (all clients' samples). With
    few sampled members per round this moves a selector by a small fraction of their mean change.
    """
    out = {}
    for key, g in global_state.items():
        delta = torch.zeros(g.shape, dtype=torch.float64)
        for w, s in zip(weights, states, strict=True):
            delta += w * (s[key].to(torch.float64) - g.to(torch.float64))
        out[key] = (g.to(torch.float64) + delta).to(g.dtype)
    return out


def paper_weights(
    replies: list[TrainReply], weighting: str, num_clients: int, total_samples: int | None = None
) -> list[float]:
    """Each member's share in the reference rule: 1/N, or its samples over every client's samples."""
    if weighting != "samples":
        return [1.0 / num_clients] * len(replies)
    if not total_samples:
        raise ValueError("weighting=samples under the paper rule needs every client's sample count")
    return [r.num_samples / total_samples for r in replies]


def aggregate(
    global_state: AdapterState,
    replies: list[TrainReply],
    weighting: str = "uniform",
    rule: str = "mean",
    num_clients: int | None = None,
    total_samples: int | None = None,
) -> AdapterState:
    """``mean``: FedAvg of the members. ``paper``: the reference's delta step (``num_clients`` = all clients,
    ``total_samples`` = all clients' training pairs, needed with weighting=samples)."""
    states = [r.state for r in replies]
    if rule == "paper":
        weights = paper_weights(replies, weighting, num_clients or len(states), total_samples)
        return delta_update(global_state, states, weights)
    weights = [float(r.num_samples) for r in replies] if weighting == "samples" else None
    return fedavg(states, weights)
