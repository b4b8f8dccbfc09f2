"""Agreement of the server's selectors with human labels on each client's test pairs."""

from __future__ import annotations

import torch

from ..models.adapters import AdapterState, load_adapter_state
from ..selector.encoding import EncodedPair
from ..selector.metrics import MIN_CLIENT_PAIRS, agreement_report, pair_outcomes
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


Scored = tuple[list[EncodedPair], torch.Tensor, torch.Tensor]  # pairs, P(A) shown (A, B), P(B) shown (B, A)


@torch.no_grad()
def score_state(
    model, encoder, choice_ids, state: AdapterState, pairs: list[EncodedPair], batch_size: int
) -> Scored:
    """``pairs`` judged by one selector state (copied into the work adapter), both orders."""
    load_adapter_state(model, WORK_ADAPTER, state)
    return (pairs, *score_pairs(model, encoder, pairs, choice_ids, batch_size))


def concat(parts: list[Scored]) -> Scored:
    """Several clients' scores as one: each part judged by its own selector, one client at a time (so one
    selector state at a time need exist: the local baseline's, a personalised copy)."""
    pairs = [p for part, _, _ in parts for p in part]
    return pairs, torch.cat([x[1] for x in parts]), torch.cat([x[2] for x in parts])


def own_report(parts: list[Scored], min_client_pairs: int = MIN_CLIENT_PAIRS) -> dict:
    """One agreement report over clients each judged by its own selector."""
    return agreement_report(*concat(parts), min_client_pairs)


def is_base_model(state: AdapterState) -> bool:
    """True for a LoRA adapter whose every B matrix is zero (as peft initialises it): it adds nothing, so every
    such selector scores exactly as the base model does (round 0's untrained selectors)."""
    b = [t for k, t in state.items() if "lora_B" in k]
    return bool(b) and all(not t.any() for t in b)


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
    min_client_pairs: int = MIN_CLIENT_PAIRS,
) -> dict:
    """Per-selector reports, plus for several selectors the client's own cluster selector and the vote.

    ``local``: each selector belongs to the client of the same name and is scored on that client only.
    """
    out: dict = {"selectors": {}}
    if local:
        parts = [
            score_state(model, encoder, choice_ids, selectors[name], pairs, batch_size)
            for name, pairs in tests.items()
            if name in selectors and pairs
        ]
        if parts:
            out["own"] = own_report(parts, min_client_pairs)
        return out
    pairs = [p for members in tests.values() for p in members]
    scores = {}
    for name, state in selectors.items():
        untouched = next((n for n in scores if is_base_model(selectors[n]) and is_base_model(state)), None)
        if untouched is not None:  # a LoRA whose B is zero is the base model: the same scores, not recomputed
            scores[name] = scores[untouched]
        else:
            _, p_ab, p_ba = score_state(model, encoder, choice_ids, state, pairs, batch_size)
            scores[name] = (p_ab, p_ba)
        out["selectors"][name] = agreement_report(pairs, *scores[name], min_client_pairs)
        # per test pair (None: a tie), in one order for every evaluation of the run: the paired test against
        # the untrained selectors (pipeline.federated_summary) reads these
        out["selectors"][name]["outcomes"] = pair_outcomes(pairs, *scores[name])
    if len(selectors) > 1:
        # each order's probabilities are voted separately so per-order figures stay comparable
        names = list(selectors)
        vote_ab = majority_vote(torch.stack([scores[n][0] for n in names]))
        vote_ba = majority_vote(torch.stack([scores[n][1] for n in names]))
        out["vote"] = agreement_report(pairs, vote_ab, vote_ba, min_client_pairs)
        out["vote"]["outcomes"] = pair_outcomes(pairs, vote_ab, vote_ba)
        # each client's test pairs judged by its own cluster's selector (clients that have a cluster only:
        # with IID/Dirichlet partitions the test pairs are grouped by natural id and have none)
        owned = [i for i, p in enumerate(pairs) if p.client in (clusters or {})]
        if owned:
            own_ab = torch.stack([scores[clusters[pairs[i].client]][0][i] for i in owned])
            own_ba = torch.stack([scores[clusters[pairs[i].client]][1][i] for i in owned])
            out["own"] = agreement_report([pairs[i] for i in owned], own_ab, own_ba, min_client_pairs)
            judged = dict(zip(owned, pair_outcomes([pairs[i] for i in owned], own_ab, own_ba), strict=True))
            out["own"]["outcomes"] = [judged.get(i) for i in range(len(pairs))]
    return out
