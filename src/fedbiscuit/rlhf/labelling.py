"""The selectors label the policy's candidates: every pair of a prompt's candidates, majority vote over K.

Each selector gives P(first candidate better) (averaged over both presentation orders unless told not to).
A selector votes for the candidate it gives more than 0.5; the majority wins, ties in the count are broken by
the mean probability, and a pair whose mean is exactly 0.5 is undecided and skipped (counted). Whichever
candidate wins becomes `chosen`: a pair the first candidate won is kept exactly like one the second won.
Each labelled pair carries the token ids the policy sampled for both candidates, which DPO scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import torch

from ..data.pairs import Comparison
from ..federated.evaluation import majority_vote
from ..models.adapters import AdapterState, load_adapter_state
from ..selector.training import score_pairs
from .generation import Candidates


@dataclass
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    first_won: bool  # candidate i (of the pair i < j) was preferred
    votes: list[float]  # every selector's P(first better)
    unanimous: bool
    chosen_finished: bool = True  # the candidate ended with a stop token rather than at the length limit
    rejected_finished: bool = True
    chosen_ids: list[int] | None = None  # the ids the policy sampled (None: tokenise the text)
    rejected_ids: list[int] | None = None


@dataclass
class LabelReport:
    pairs: list[PreferencePair]
    undecided: int = 0
    identical: int = 0  # two candidates with the same text cannot be compared
    disagreement: float = 0.0  # fraction of labelled pairs on which the selectors were not unanimous
    first_won: int = 0
    selector_win_share: dict[str, float] = field(default_factory=dict)  # how often each was in the majority

    def summary(self) -> dict:
        n = len(self.pairs)
        return {
            "pairs": n,
            "undecided": self.undecided,
            "identical": self.identical,
            "first_won": self.first_won,
            "second_won": n - self.first_won,
            "disagreement": self.disagreement,
            "in_majority": self.selector_win_share,
        }


def candidate_pairs(candidates: Candidates) -> tuple[list[Comparison], int]:
    """Every unordered pair (i < j) of each prompt's candidates as a Comparison (label unused), and how many
    pairs were skipped because the two texts are identical."""
    out, _, identical = _indexed_pairs(candidates)
    return out, identical


def _indexed_pairs(candidates: Candidates) -> tuple[list[Comparison], list[tuple[int, int, int]], int]:
    """candidate_pairs, plus where each pair came from: (prompt index, i, j)."""
    out, where, identical = [], [], 0
    for k, (prompt, texts) in enumerate(zip(candidates.prompts, candidates.texts, strict=True)):
        for i, j in combinations(range(len(texts)), 2):
            if texts[i] == texts[j]:
                identical += 1
                continue
            out.append(Comparison(prompt, texts[i], texts[j], 0.5, "policy", "candidates"))
            where.append((k, i, j))
    return out, where, identical


def vote(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """probs [K, pairs] of P(first better) -> (first won [pairs] bool, decided [pairs] bool), by the voting rule
    evaluation uses too (federated.evaluation.majority_vote)."""
    share = majority_vote(probs)
    return share > 0.5, share != 0.5


def selector_probs(
    model,
    encoder,
    choice_ids,
    selectors: dict[str, AdapterState],
    encoded,
    slot: str,
    swap_average: bool = True,
    batch_size: int = 16,
    progress=None,
) -> torch.Tensor:
    """[K, pairs] P(first better) from each selector, loaded in turn into adapter ``slot``."""
    rows = []
    for name, state in selectors.items():
        load_adapter_state(model, slot, state, where=f"selector {name}")
        model.set_adapter(slot)
        p_ab, p_ba = score_pairs(model, encoder, encoded, choice_ids, batch_size, swap_average, progress)
        rows.append((p_ab + (1.0 - p_ba)) / 2 if swap_average else p_ab)
    return torch.stack(rows)


def label_candidates(
    model,
    encoder,
    choice_ids: tuple[int, int],
    selectors: dict[str, AdapterState],
    candidates: Candidates,
    *,
    slot: str,
    swap_average: bool = True,
    batch_size: int = 16,
    progress=None,
) -> LabelReport:
    """Label every candidate pair with a majority vote of ``selectors`` (loaded in turn into adapter ``slot``)."""
    if not selectors:
        raise ValueError("no selectors to label the candidates with")
    comparisons, where, identical = _indexed_pairs(candidates)
    if not comparisons:
        return LabelReport([], identical=identical)
    encoded = encoder.encode(comparisons)  # tokenised once, scored by every selector
    probs = selector_probs(
        model, encoder, choice_ids, selectors, encoded, slot, swap_average, batch_size, progress
    )
    first, decided = vote(probs)
    hard = probs > 0.5
    unanimous = (hard == hard[0]).all(0) & (probs != 0.5).all(0)
    tokens = candidates.tokens

    def ids(prompt: int, j: int) -> list[int] | None:
        return None if tokens is None else tokens[prompt][j]

    pairs = []
    for k, (comp, (prompt, i, j)) in enumerate(zip(comparisons, where, strict=True)):
        if not decided[k]:
            continue
        won = bool(first[k])
        chosen, rejected = (i, j) if won else (j, i)
        texts = candidates.texts[prompt]
        pairs.append(
            PreferencePair(
                comp.prompt,
                texts[chosen],
                texts[rejected],
                won,
                probs[:, k].tolist(),
                bool(unanimous[k]),
                candidates.is_finished(prompt, chosen),
                candidates.is_finished(prompt, rejected),
                ids(prompt, chosen),
                ids(prompt, rejected),
            )
        )
    kept = decided.sum().item()
    majority = (hard == first.unsqueeze(0)) & decided.unsqueeze(0)
    return LabelReport(
        pairs,
        undecided=int(len(comparisons) - kept),
        identical=identical,
        disagreement=float((~unanimous & decided).sum().item() / kept) if kept else 0.0,
        first_won=sum(p.first_won for p in pairs),
        selector_win_share={
            name: float(majority[i].sum().item() / kept) if kept else 0.0 for i, name in enumerate(selectors)
        },
    )
