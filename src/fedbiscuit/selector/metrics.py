"""Agreement of a selector with human labels: overall and per client, each order and both averaged, Brier."""

from __future__ import annotations

from collections import defaultdict

import torch

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
        avg = (p_ab + p_a_from_ba) / 2
        out |= {
            "agreement_ba": _agree(p_a_from_ba, hard, decided),
            "agreement": _agree(avg, hard, decided),
            "brier": _brier(avg, labels),
            # how much the answer depends on where a response is shown: 0 means none
            "position_bias": float(((p_ab + p_ba) / 2 - 0.5).mean()) if len(labels) else float("nan"),
        }
    else:
        out |= {"agreement": out["agreement_ab"], "brier": out["brier_ab"]}
    return out


def _agree(p: torch.Tensor, hard: torch.Tensor, decided: torch.Tensor) -> float:
    """Share of decided pairs where the selector sides with people; an exact 0.5 (no preference) counts half."""
    if not decided.any():
        return float("nan")
    score = ((p > 0.5) == hard).float()
    score = torch.where(p == 0.5, torch.full_like(score, 0.5), score)
    return float(score[decided].mean())


def _brier(p: torch.Tensor, labels: torch.Tensor) -> float:
    return float(((p - labels) ** 2).mean()) if len(labels) else float("nan")


def agreement_report(pairs: list[EncodedPair], p_ab: torch.Tensor, p_ba: torch.Tensor | None) -> dict:
    """{"overall": {...}, "clients": {name: {...}}} with agreement, per-order agreement, Brier and bias."""
    labels = torch.tensor([p.label for p in pairs], dtype=torch.float32)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        groups[p.client].append(i)
    clients = {}
    for name, idx in sorted(groups.items()):
        t = torch.tensor(idx)
        clients[name] = _summary(labels[t], p_ab[t], None if p_ba is None else p_ba[t])
    return {"overall": _summary(labels, p_ab, p_ba), "clients": clients}
