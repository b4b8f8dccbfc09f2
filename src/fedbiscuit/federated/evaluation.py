"""Agreement of the server's selectors with human labels on each client's test pairs."""

from __future__ import annotations

import torch

from ..models.adapters import AdapterState, load_adapter_state
from ..selector.encoding import EncodedPair
from ..selector.metrics import agreement_report
from ..selector.training import score_pairs
from .client import WORK_ADAPTER


def majority_vote(probs: torch.Tensor) -> torch.Tensor:
    """[K, n] P(A) per selector -> [n] the share of the votes cast that went to A. The one voting rule, used by
    evaluation and by Phase 2's labelling alike:

    - a selector votes A when P(A) > 0.5, B when P(A) < 0.5, and abstains at exactly 0.5;
    - equal counts (all abstaining included) fall back to the mean P(A), so the result is > 0.5 when A wins,
      < 0.5 when B wins, and exactly 0.5 only when the pair is undecided.
    """
    for_a = (probs > 0.5).sum(0)
    for_b = (probs < 0.5).sum(0)
    share = for_a.float() / (for_a + for_b).clamp(min=1).float()
    return torch.where(for_a == for_b, probs.mean(0), share)


@torch.no_grad()
def evaluate_selectors(
    model,
    encoder,
    choice_ids,
    selectors: dict[str, AdapterState],
    tests: dict[str, list[EncodedPair]],
    clusters: dict[str, str] | None,
    batch_size: int,
    local: bool = False,
) -> dict:
    """Per-selector reports, plus for several selectors the client's own cluster selector and the vote.

    ``local``: each selector belongs to the client of the same name and is scored on that client only.
    """
    out: dict = {"selectors": {}}
    if local:
        probs = {}
        for name, pairs in tests.items():
            if name in selectors and pairs:
                load_adapter_state(model, WORK_ADAPTER, selectors[name])
                p_ab, p_ba = score_pairs(model, encoder, pairs, choice_ids, batch_size)
                probs[name] = (pairs, p_ab, p_ba)
        if not probs:
            return out
        all_pairs = [p for pairs, _, _ in probs.values() for p in pairs]
        p_ab = torch.cat([x[1] for x in probs.values()])
        p_ba = torch.cat([x[2] for x in probs.values()])
        out["own"] = agreement_report(all_pairs, p_ab, p_ba)
        return out
    pairs = [p for members in tests.values() for p in members]
    scores = {}
    for name, state in selectors.items():
        load_adapter_state(model, WORK_ADAPTER, state)
        scores[name] = score_pairs(model, encoder, pairs, choice_ids, batch_size)
        out["selectors"][name] = agreement_report(pairs, *scores[name])
    if len(selectors) > 1:
        # each order's probabilities are voted separately so per-order figures stay comparable
        names = list(selectors)
        vote_ab = majority_vote(torch.stack([scores[n][0] for n in names]))
        vote_ba = majority_vote(torch.stack([scores[n][1] for n in names]))
        out["vote"] = agreement_report(pairs, vote_ab, vote_ba)
        # each client's test pairs judged by its own cluster's selector (clients that have a cluster only:
        # with IID/Dirichlet partitions the test pairs are grouped by natural id and have none)
        owned = [i for i, p in enumerate(pairs) if p.client in (clusters or {})]
        if owned:
            own_ab = torch.stack([scores[clusters[pairs[i].client]][0][i] for i in owned])
            own_ba = torch.stack([scores[clusters[pairs[i].client]][1][i] for i in owned])
            out["own"] = agreement_report([pairs[i] for i in owned], own_ab, own_ba)
    return out
