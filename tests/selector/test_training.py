import math

import pytest
import torch

from fedbiscuit.config import LoraSettings, TrainConfig
from fedbiscuit.data.pairs import Comparison
from fedbiscuit.models.adapters import adapter_state, add_adapter
from fedbiscuit.selector.encoding import PairEncoder
from fedbiscuit.selector.metrics import agreement_report
from fedbiscuit.selector.prompts import Template, answer_token_ids
from fedbiscuit.selector.training import choice_loss, planned_steps, score_pairs, train_selector


def test_choice_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([1.0, 0.25])
    p0 = 1 / (1 + math.exp(-2.0))
    q0 = 1 / (1 + math.exp(1.0))
    expected = -(math.log(p0) + 0.25 * math.log(q0) + 0.75 * math.log(1 - q0)) / 2
    assert choice_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_planned_steps_from_epochs():
    assert planned_steps(TrainConfig(steps=None, epochs=2, batch_size=4, grad_accum=2), 20) == 5
    assert planned_steps(TrainConfig(steps=7), 1000) == 7


def synthetic(n: int, seed: int, good: str = "yes", bad: str = "no") -> list[Comparison]:
    """Pairs where people always prefer the response that says ``good``; A/B positions are random."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        a_good = bool(torch.randint(0, 2, (1,), generator=g))
        a, b = (good, bad) if a_good else (bad, good)
        out.append(Comparison(f"question {seed}-{i}", a, b, 1.0 if a_good else 0.0, f"c{i % 2}", "synthetic"))
    return out


def _setup(tiny, seed=0):
    model, tok = tiny
    model = add_adapter(model, "s", LoraSettings(r=8, alpha=16, dropout=0.0), seed=seed)
    enc = PairEncoder(tok, Template.parse("generic"), 256)
    return model, enc, answer_token_ids(tok)


def test_training_learns_a_preference(tiny):
    model, enc, choice = _setup(tiny)
    train, test = enc.encode(synthetic(64, 0)), enc.encode(synthetic(40, 1))
    before = agreement_report(test, *score_pairs(model, enc, test, choice, 16))["overall"]
    cfg = TrainConfig(lr=1e-2, steps=40, batch_size=8)
    result = train_selector(model, enc, train, cfg, choice, seed=0)
    after = agreement_report(test, *score_pairs(model, enc, test, choice, 16))["overall"]
    assert result.steps == 40 and result.samples == 40 * 8
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert after["agreement"] >= 0.95 and after["brier"] < before["brier"]
    # shown both orders, the selector cannot win by always answering A
    assert after["agreement_ab"] >= 0.9 and after["agreement_ba"] >= 0.9


def test_training_is_deterministic_given_a_seed(tiny):
    from fedbiscuit.models.tiny import tiny_model

    states = []
    for _ in range(2):
        model, enc, choice = _setup(tiny_model(seed=0))
        pairs = enc.encode(synthetic(32, 0))
        train_selector(
            model, enc, pairs, TrainConfig(lr=1e-3, steps=5, batch_size=4, grad_accum=2), choice, seed=3
        )
        states.append(adapter_state(model, "s"))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_only_the_active_adapter_trains(tiny):
    model, enc, choice = _setup(tiny)
    model = add_adapter(model, "other", LoraSettings(r=8, dropout=0.0), seed=1)
    model.set_adapter("s")
    other = adapter_state(model, "other")
    before = adapter_state(model, "s")
    train_selector(
        model, enc, enc.encode(synthetic(16, 0)), TrainConfig(lr=1e-2, steps=3, batch_size=4), choice
    )
    assert all(torch.equal(other[k], adapter_state(model, "other")[k]) for k in other)
    assert any(not torch.equal(before[k], adapter_state(model, "s")[k]) for k in before)


def test_nan_loss_stops_with_a_clear_error(tiny):
    model, enc, choice = _setup(tiny)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="train.lr"):
        train_selector(model, enc, enc.encode(synthetic(8, 0)), TrainConfig(steps=2, batch_size=4), choice)


def test_warmup_and_cosine_schedule_and_progressive_agreement(tiny):
    model, enc, choice = _setup(tiny)
    train = enc.encode(synthetic(64, 0))
    cfg = TrainConfig(lr=1e-2, steps=20, batch_size=4, schedule="cosine", warmup_steps=5, log_every=5)
    logged = []
    result = train_selector(model, enc, train, cfg, choice, seed=0, on_log=logged.append)
    assert logged == result.history and [h["step"] for h in logged] == [5, 10, 15, 20]
    # transformers' cosine-with-warm-up, the rate each logged step ran at (step s is index s - 1): 4/5 of the
    # rate in the last warm-up step, then half a cosine towards 0 at the end
    expected = [1e-2 * 0.8] + [1e-2 * 0.5 * (1 + math.cos(math.pi * (s - 6) / 15)) for s in (10, 15, 20)]
    assert [h["lr"] for h in logged] == pytest.approx(expected, abs=1e-9)
    assert [h["pairs_seen"] for h in logged] == [20, 40, 60, 80]
    # pair agreement on batches before the model steps on them (unseen pairs in the first epoch)
    assert all(0.0 <= h["pair_agreement"] <= 1.0 for h in logged)
    assert logged[-1]["pair_agreement"] >= 0.9


def test_schedule_settings_that_would_be_ignored_are_errors_naming_the_key():
    from fedbiscuit.config import ConfigError, config_from_dict

    fed = {"pipeline": "federated", "federated": {"rounds": 10, "local_steps": 4}}
    assert (
        config_from_dict({**fed, "train": {"schedule": "cosine", "warmup_steps": 8}}).train.schedule
        == "cosine"
    )
    with pytest.raises(
        ConfigError, match=r"train.warmup_steps=40 is not below the run's 40 sequential steps"
    ):
        config_from_dict({**fed, "train": {"warmup_steps": 40}})
    with pytest.raises(ConfigError, match=r"train.epochs sets the length of a centralized run"):
        config_from_dict({**fed, "train": {"steps": None, "epochs": 2}})
    assert config_from_dict({**fed, "eval": {"heldout_every": 5}}).eval.heldout_every == 5
    with pytest.raises(ConfigError, match=r"eval.heldout_every=5 draws phase 1's held-out learning curve"):
        config_from_dict(
            {"pipeline": "rlhf", "rlhf": {"judge": {"kind": "hf"}}, "eval": {"heldout_every": 5}}
        )
    with pytest.raises(ConfigError, match=r"train.min_lr_ratio=0.1 is the floor of a decay"):
        config_from_dict({"train": {"min_lr_ratio": 0.1}})
    with pytest.raises(
        ConfigError, match=r"train.schedule is set, but rlhf.method=feddpo trains no selector"
    ):
        config_from_dict(
            {
                "pipeline": "rlhf",
                "rlhf": {"method": "feddpo", "judge": {"kind": "hf"}},
                "train": {"schedule": "linear"},
            }
        )


def test_length_grouped_batches_cover_every_pair_once_per_epoch_with_little_padding():
    from fedbiscuit.selector.training import _batches

    gen = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(10, 500, (400,), generator=torch.Generator().manual_seed(1))]
    batches = _batches(lengths, 8, gen, group_by_length=True)
    epoch = [next(batches) for _ in range(50)]
    assert sorted(i for b in epoch for i in b) == list(range(400))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epoch) / len(epoch)
    plain = _batches(lengths, 8, torch.Generator().manual_seed(0), group_by_length=False)
    plain_spread = (
        sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in (next(plain) for _ in range(50)))
        / 50
    )
    assert spread < plain_spread / 5  # neighbours in a batch have similar lengths
    shortest = [min(lengths[i] for i in b) for b in epoch]
    assert shortest != sorted(shortest)  # but the batches come in a shuffled order


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_factor_is_transformers_schedule_and_decays_to_its_floor(schedule):
    from transformers import get_scheduler

    from fedbiscuit.selector.training import lr_factor

    total, warmup = 40, 7
    cfg = TrainConfig(lr=1.0, schedule=schedule, warmup_steps=warmup)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    name = "constant_with_warmup" if schedule == "constant" else schedule
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    for step in range(total):
        assert lr_factor(step, total, cfg) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), step
        opt.step()
        sched.step()
    if schedule != "constant":
        floored = TrainConfig(lr=1.0, schedule=schedule, warmup_steps=warmup, min_lr_ratio=0.2)
        assert lr_factor(total, total, floored) == pytest.approx(0.2)
        assert lr_factor(warmup, total, floored) == pytest.approx(1.0)
        mid = lr_factor((warmup + total) // 2, total, floored)
        assert 0.2 < mid < 1.0 and mid == pytest.approx(
            0.2 + 0.8 * lr_factor((warmup + total) // 2, total, cfg)
        )


def test_a_window_puts_the_steps_on_a_longer_schedule(tiny):
    """A federated client's round: steps first ... first + n - 1 of the run's schedule, with its own optimizer."""
    from fedbiscuit.selector.training import lr_factor, make_optimizer

    model, enc, choice = _setup(tiny)
    pairs = enc.encode(synthetic(16, 0))
    cfg = TrainConfig(lr=1e-2, steps=100, batch_size=4, log_every=1, schedule="cosine", warmup_steps=2)
    result = train_selector(
        model,
        enc,
        pairs,
        cfg,
        choice,
        optimizer=make_optimizer(model, cfg),
        steps=3,
        schedule_window=(10, 20),
    )
    assert [h["lr"] for h in result.history] == pytest.approx(
        [1e-2 * lr_factor(s, 20, cfg) for s in (10, 11, 12)]
    )
    constant = train_selector(model, enc, pairs, cfg, choice, optimizer=make_optimizer(model, cfg), steps=2)
    assert [h["lr"] for h in constant.history] == [1e-2, 1e-2]  # no window: the caller's constant rate
