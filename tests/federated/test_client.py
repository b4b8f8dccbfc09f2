"""What a client encodes and scores: a grouping round scores only the prefix of the held-out slice it needs."""

import pytest

from fedbiscuit.data import ClientData
from fedbiscuit.data.pairs import Comparison
from fedbiscuit.federated.client import SelectorClient
from fedbiscuit.models.tiny import tiny_tokenizer
from fedbiscuit.selector.encoding import PairEncoder
from fedbiscuit.selector.prompts import Template, answer_token_ids


class CountingEncoder(PairEncoder):
    """On the cached path encoding a pair computes its trunk states: count how many pairs get encoded."""

    encoded = 0

    def encode(self, pairs, owner=None):
        self.encoded += len(pairs)
        return super().encode(pairs, owner)


def _pairs(n, tag):
    return [Comparison(f"{tag} question {i}", "yes", "no", 1.0, "c", "test") for i in range(n)]


def test_scoring_encodes_only_the_pairs_a_grouping_round_uses():
    tok = tiny_tokenizer()
    enc = CountingEncoder(tok, Template.parse("generic"), 512)
    client = SelectorClient(
        0, ClientData("c", _pairs(30, "train"), _pairs(20, "held")), enc, answer_token_ids(tok)
    )
    pairs = client.scoring_pairs(4)
    assert [tok.decode(p.prompt) for p in pairs] == [f"held question {i}" for i in range(4)]
    assert enc.encoded == 4  # not the 20 held-out pairs, nor the 30 training pairs
    client.scoring_pairs(4)
    assert enc.encoded == 4  # kept for the next grouping round
    assert len(client.scoring_pairs(None)) == 20 and enc.encoded == 24
    # a client without a held-out slice scores on (a prefix of) its training pairs
    lone = SelectorClient(1, ClientData("d", _pairs(10, "train"), []), enc, answer_token_ids(tok))
    assert len(lone.scoring_pairs(3)) == 3


def test_scores_come_with_the_standard_error_of_each_selectors_difference_to_the_best(tiny):
    """The grouping's evidence: mean loss per selector, and per selector the standard error of its per-pair
    loss minus the best selector's, recomputed here from the per-pair probabilities."""
    import torch

    from fedbiscuit.config import LoraSettings
    from fedbiscuit.models.adapters import adapter_state, add_adapter, load_adapter_state
    from fedbiscuit.selector.training import score_pairs

    model, tok = tiny
    model = add_adapter(model, "selector", LoraSettings(r=4, alpha=8, dropout=0.0), seed=0)
    states = {}
    for k in range(2):
        torch.manual_seed(k)
        st = adapter_state(model, "selector")
        states[f"s{k}"] = {n: torch.randn_like(v) * 0.5 for n, v in st.items()}
    enc = PairEncoder(tok, Template.parse("generic"), 256)
    choice = answer_token_ids(tok)
    held = [Comparison(f"held {i}", f"yes {i}", f"no {i}", float(i % 2), "c", "t") for i in range(12)]
    client = SelectorClient(0, ClientData("c", _pairs(4, "train"), held), enc, choice)
    reply = client.score(model, states, None, batch_size=5)
    per_pair = {}
    pairs = enc.encode(held)
    for name, st in states.items():
        load_adapter_state(model, "selector", st)
        p_ab, p_ba = score_pairs(model, enc, pairs, choice, 16)
        label = torch.tensor([p.label for p in held], dtype=torch.float64)
        loss_ab = -(label * p_ab.double().log() + (1 - label) * (1 - p_ab.double()).log())
        loss_ba = -((1 - label) * p_ba.double().log() + label * (1 - p_ba.double()).log())
        per_pair[name] = (loss_ab + loss_ba) / 2
    best = min(per_pair, key=lambda n: per_pair[n].mean())
    other = next(n for n in per_pair if n != best)
    assert reply.num_pairs == 12
    for name in states:
        assert reply.losses[name] == pytest.approx(per_pair[name].mean().item(), rel=1e-4)
    diff = per_pair[other] - per_pair[best]
    assert reply.diff_se[best] == 0.0
    assert reply.diff_se[other] == pytest.approx((diff.std() / 12**0.5).item(), rel=1e-3)


def test_a_gradient_step_is_one_plain_sgd_step_of_rate_one_over_the_first_pairs(tiny):
    """grouping: gradients: the client returns its state minus the mean gradient of the choice loss over its
    first N training pairs, as torch's SGD with lr 1 takes it; pairs beyond N play no part."""
    import torch

    from fedbiscuit.config import LoraSettings
    from fedbiscuit.models.adapters import adapter_state, add_adapter, load_adapter_state
    from fedbiscuit.selector.training import choice_loss

    model, tok = tiny
    model = add_adapter(model, "selector", LoraSettings(r=4, alpha=8, dropout=0.0), seed=0)
    torch.manual_seed(0)
    start = {k: torch.randn_like(v) * 0.3 for k, v in adapter_state(model, "selector").items()}
    enc = PairEncoder(tok, Template.parse("generic"), 256)
    choice = answer_token_ids(tok)
    train = [Comparison(f"q {i}", f"yes {i}", f"no {i}", float(i % 2), "c", "t") for i in range(11)]
    client = SelectorClient(0, ClientData("c", train, []), enc, choice)
    reply = client.gradient_step(model, start, max_pairs=7, batch_size=3)
    assert reply.num_samples == 7

    load_adapter_state(model, "selector", start)  # the same step with torch's SGD, all 7 pairs in one batch
    params = [w for w in model.parameters() if w.requires_grad]
    opt = torch.optim.SGD(params, lr=1.0)
    logits, target = enc.logits(model, enc.encode(train[:7]), True, choice)
    choice_loss(logits.float(), target.float()).backward()
    opt.step()
    expected = adapter_state(model, "selector")
    moved = 0.0
    for k, v in expected.items():
        assert torch.allclose(reply.state[k], v, atol=1e-5), k
        moved += float((v - start[k]).abs().sum())
    assert moved > 0  # a real step, not the state sent
    assert client.gradient_step(model, start, max_pairs=7, batch_size=7).state.keys() == start.keys()


def test_a_round_that_fails_part_way_leaves_the_kept_optimizer_state_as_it_was(tiny, monkeypatch):
    """federated.reset_optimizer=false: the AdamW state a client keeps between rounds is what its last completed
    round left; a round that raises after some steps (here a non-finite loss at its third step) changes nothing
    (the loaded optimizer would otherwise step the kept tensors in place)."""
    import torch

    from fedbiscuit.config import LoraSettings, TrainConfig
    from fedbiscuit.models.adapters import adapter_state, add_adapter

    model, tok = tiny
    model = add_adapter(model, "selector", LoraSettings(r=4, alpha=8, dropout=0.0), seed=0)
    enc = PairEncoder(tok, Template.parse("generic"), 256)
    train = [Comparison(f"q {i}", f"yes {i}", f"no {i}", float(i % 2), "c", "t") for i in range(8)]
    client = SelectorClient(0, ClientData("c", train, []), enc, answer_token_ids(tok))
    state = adapter_state(model, "selector")
    cfg = TrainConfig(lr=1e-2, batch_size=2)
    client.train(model, state, cfg, 3, seed=0, reset_optimizer=False)
    kept = {i: {k: v.clone() for k, v in s.items()} for i, s in client.optimizer_state["state"].items()}
    assert kept and all(float(s["exp_avg"].abs().sum()) > 0 for s in kept.values())

    real, calls = PairEncoder.logits, []

    def fails_at_the_third_step(self, *a, **kw):
        calls.append(1)
        logits, target = real(self, *a, **kw)
        return (logits * float("nan") if len(calls) == 3 else logits), target

    monkeypatch.setattr(PairEncoder, "logits", fails_at_the_third_step)
    with pytest.raises(FloatingPointError):
        client.train(model, state, cfg, 4, seed=1, reset_optimizer=False)
    assert len(calls) == 3  # two steps were taken before the failure
    for i, s in client.optimizer_state["state"].items():
        for k, v in s.items():
            assert torch.equal(v, kept[i][k]), (i, k)
