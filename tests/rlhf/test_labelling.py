import pytest
import torch

from fedbiscuit.config import LoraSettings, SelectorConfig
from fedbiscuit.models.adapters import adapter_state, add_adapter, load_adapter_state
from fedbiscuit.rlhf.generation import Candidates
from fedbiscuit.rlhf.labelling import candidate_pairs, label_candidates, vote
from fedbiscuit.selector import build_encoder


def test_majority_vote_with_ties_broken_by_the_mean():
    probs = torch.tensor(
        [
            [0.9, 0.2, 0.6, 0.5, 0.7],
            [0.8, 0.3, 0.4, 0.5, 0.45],
            [0.1, 0.4, 0.5, 0.5, 0.5],
        ]
    )
    first, decided = vote(probs)
    # col0: 2 for first; col1: 3 for second; col2: 1-1 tie, mean 0.5 -> undecided; col3: all 0.5 -> undecided;
    # col4: 1 vs 1 (one abstains), mean 0.55 -> first
    assert first.tolist()[:2] == [True, False] and first.tolist()[4] is True
    assert decided.tolist() == [True, True, False, False, True]


def test_candidate_pairs_are_every_unordered_pair_and_skip_identical_texts():
    c = Candidates(["p", "q"], [["a", "b", "c"], ["x", "x"]], [[1, 1, 1], [1, 1]])
    pairs, identical = candidate_pairs(c)
    assert [(p.response_a, p.response_b) for p in pairs] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert identical == 1


def _p_first_by_hand(model, encoder, comps, choice_ids) -> torch.Tensor:
    """P(first better) from the plain full model, one sequence at a time: the softmax of the two answer logits
    at the last position, averaged over both presentation orders (no batching, padding or scoring code)."""
    model.eval()
    out = []
    with torch.no_grad():
        for pair in encoder.encode(comps):
            p = []
            for swap in (False, True):
                logits = model(input_ids=torch.tensor([encoder.sequence(pair, swap)])).logits[0, -1]
                p.append(torch.softmax(logits[list(choice_ids)].float(), 0)[0].item())
            out.append((p[0] + 1 - p[1]) / 2)  # swapped, "A" names the second candidate
    return torch.tensor(out)


def test_labels_follow_the_selector_in_both_directions(tiny):
    model, tok = tiny
    model = add_adapter(model, "selector", LoraSettings(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)  # the test's own draw, whatever ran before it
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    encoder, choice_ids = build_encoder(
        tok,
        SelectorConfig(template="Q:{prompt}\nA:{response_a}\nB:{response_b}\nAnswer:", max_length=128),
        "generic",
    )
    texts = [["short", "a longer answer", "mid one"], ["yes", "no", "maybe so"], ["one", "two", "three!"]]
    cands = Candidates(["q1", "q2", "q3"], texts, [[1] * 3] * 3)
    state = adapter_state(model, "selector")
    report = label_candidates(
        model, encoder, choice_ids, {"s": state}, cands, slot="selector", swap_average=True
    )
    comps, _ = candidate_pairs(cands)
    p = _p_first_by_hand(model, encoder, comps, choice_ids)
    assert len(report.pairs) == 9 and report.undecided == 0
    assert 0 < report.first_won < 9  # both kinds occur, and both are kept
    for pair, comp, prob in zip(report.pairs, comps, p.tolist(), strict=True):
        assert pair.first_won == (prob > 0.5)
        assert pair.chosen == (comp.response_a if prob > 0.5 else comp.response_b)
    assert report.disagreement == 0.0 and report.selector_win_share == {"s": 1.0}
    # a second selector: disagreement is the share of decided pairs on which the two hard votes differ
    torch.manual_seed(5)
    other = {k: (torch.randn_like(v) * 2.0 if "lora_B" in k else v) for k, v in state.items()}
    two = label_candidates(model, encoder, choice_ids, {"s": state, "t": other}, cands, slot="selector")
    load_adapter_state(model, "selector", other)
    q = _p_first_by_hand(model, encoder, comps, choice_ids)
    differ = ((p > 0.5) != (q > 0.5)).float().mean().item()
    assert two.disagreement == pytest.approx(differ) and 0 < differ < 1
    votes = [v for x in two.pairs for v in x.votes]
    assert votes == pytest.approx(
        [v for a, b in zip(p.tolist(), q.tolist(), strict=True) for v in (a, b)], abs=1e-5
    )


def test_labels_carry_whether_each_candidate_finished(tiny):
    model, tok = tiny
    model = add_adapter(model, "selector", LoraSettings(r=4, alpha=8, dropout=0.0))
    encoder, choice_ids = build_encoder(
        tok,
        SelectorConfig(template="Q:{prompt}\nA:{response_a}\nB:{response_b}\nAnswer:", max_length=128),
        "generic",
    )
    cands = Candidates(["q"], [["done answer", "cut answ"]], [[2, 8]], finished=[[True, False]])
    report = label_candidates(
        model, encoder, choice_ids, {"s": adapter_state(model, "selector")}, cands, slot="selector"
    )
    (pair,) = report.pairs
    flags = {pair.chosen: pair.chosen_finished, pair.rejected: pair.rejected_finished}
    assert flags == {"done answer": True, "cut answ": False}


def test_selectors_score_with_the_policy_adapter_switched_off(tiny):
    """Labelling must not depend on the policy adapter's weights: only the selector slot is active."""
    model, tok = tiny
    model = add_adapter(model, "selector", LoraSettings(r=4, alpha=8, dropout=0.0), seed=1)
    model = add_adapter(model, "policy", LoraSettings(r=4, alpha=8, dropout=0.0), seed=2)
    encoder, choice_ids = build_encoder(
        tok,
        SelectorConfig(template="Q:{prompt}\nA:{response_a}\nB:{response_b}\nAnswer:", max_length=128),
        "generic",
    )
    cands = Candidates(["q1", "q2"], [["a", "bb", "ccc"], ["x", "yy", "zzz"]], [[1] * 3] * 2)
    state = adapter_state(model, "selector")
    before = label_candidates(model, encoder, choice_ids, {"s": state}, cands, slot="selector")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".policy." in name and "lora_B" in name:
                p.normal_(0, 5.0)
    model.set_adapter("policy")  # as after a DPO step
    after = label_candidates(model, encoder, choice_ids, {"s": state}, cands, slot="selector")
    assert [p.votes for p in after.pairs] == [p.votes for p in before.pairs]
