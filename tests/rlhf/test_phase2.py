"""Phase 2 end to end on planted data with the tiny model: selectors -> candidates -> votes -> DPO -> eval."""

from pathlib import Path

import pytest
import torch
import yaml

from fedbiscuit.config import ConfigError, config_from_dict
from fedbiscuit.data.synthetic import planted_run_config
from fedbiscuit.federated.checkpoint import list_checkpoints, load_checkpoint
from fedbiscuit.models.adapters import read_adapter
from fedbiscuit.runner import run
from fedbiscuit.runs import read_records


def rlhf_config(tmp_path, name="rl", algorithm=None, **rlhf):
    # the FedDPO / FedSFT baselines train one policy as FedBis does and sample no candidates: the settings of
    # FedBiscuit and of the candidates and DPO log would be refused there (config.py)
    baseline = rlhf.get("method") in ("feddpo", "fedsft")
    algorithm = algorithm or ("fedbis" if baseline else "fedbiscuit")
    fedbiscuit = {"num_selectors": 2, "warmup_rounds": 1, "regroup_every": 2, "grouping_pairs": 4}
    raw = planted_run_config(
        tmp_path,
        name,
        algorithm=algorithm,
        rounds=4,
        clients_per_round=2,
        local_steps=1,
        **({"fedbiscuit": fedbiscuit} if algorithm == "fedbiscuit" else {}),
    )
    raw["pipeline"] = "rlhf"
    raw["model"]["cache_dir"] = str(tmp_path / "cache")
    raw["rlhf"] = {
        "num_prompts": 6,
        "eval_prompts": 4,
        "generation": {
            "max_new_tokens": 8,
            "max_prompt_length": 48,
            **({} if baseline else {"num_candidates": 3}),
        },
        "dpo": {
            "batch_size": 2,
            "lr": 1e-3,
            "lora": {"r": 4, "alpha": 8},
            **({} if baseline else {"log_every": 1}),
        },
        "best_of_n": 4,
        "best_of_n_prompts": 3,
        "judge": {"kind": "phase1"},  # by name: the test runs have no independent judge
        **rlhf,
    }
    # where phase 1 does not run, its settings would be refused (config.py): a baseline has no train section
    # and no selector to evaluate; a finished run's selectors, no federated section either
    if baseline or rlhf.get("selectors_from"):
        del raw["train"], raw["eval"]["before_training"]
        raw["federated"].pop("eval_every")
    if rlhf.get("selectors_from"):
        del raw["federated"]
    return raw


def events(result, kind):
    return [
        r
        for r in read_records(__import__("pathlib").Path(result["run_dir"]) / "metrics.jsonl")
        if r["event"] == kind
    ]


def test_offline_run_labels_trains_and_evaluates(tmp_path):
    cfg = config_from_dict(rlhf_config(tmp_path), "test")
    out = run(cfg, quiet=True)
    labels = out["labels"]
    assert (
        labels["pairs"] + labels["undecided"] + labels["identical"] == 6 * 3
    )  # 3 pairs of 3 candidates each
    assert labels["first_won"] + labels["second_won"] == labels["pairs"]
    assert 0.0 <= labels["disagreement"] <= 1.0
    # DPO ran over every labelled pair: ceil(pairs / batch 2) steps for one epoch
    assert out["dpo"]["steps"] == -(-labels["pairs"] // 2)
    dpo = events(out, "dpo")
    assert [d["step"] for d in dpo] == list(range(1, out["dpo"]["steps"] + 1))
    win = events(out, "winrate")
    assert [w["label"] for w in win] == ["initial policy", "tuned policy"]
    for w in win:
        assert w["wins"] + w["losses"] + w["ties"] == 4 and 0 <= w["win_rate"] <= 1
    bon = out["best_of_n"]
    assert bon["n"] == 4 and bon["pick_vs_reference"]["prompts"] == 3
    # the curve: n = 1, 2, 4 from one bracket, the judge's and the selectors' win rates; n = 1 is the first sample
    assert [c["n"] for c in bon["curve"]] == [1, 2, 4]
    assert bon["curve"][0]["judge"] == bon["first_vs_reference"]["win_rate"]
    assert bon["curve"][-1]["judge"] == bon["pick_vs_reference"]["win_rate"]
    assert all(0 <= c["selectors"] <= 1 and c["kl_bon"] >= 0 for c in bon["curve"])
    assert (Path(out["run_dir"]) / "best_of_n.png").stat().st_size > 5_000  # the report draws the curve
    assert "NOT independent" in out["judge"]
    state, meta = read_adapter(out["policy_checkpoint"])
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in state.items())  # the policy moved
    assert "lora" in meta
    # a second run finds the initial policy's candidates in the content-addressed cache
    again = run(cfg, quiet=True, overwrite=True)
    gens = {g["desc"]: g for g in events(again, "generation")}
    assert gens["candidates (1/1)"]["from_cache"] and gens["reference answers"]["from_cache"]
    assert again["labels"] == labels
    # resumed when finished: phase 1 from its last checkpoint, phase 2 again, the earlier attempt's records gone
    resumed = run(cfg, quiet=True, resume=True)
    assert [w["label"] for w in events(resumed, "winrate")] == ["initial policy", "tuned policy"]
    assert [d["step"] for d in events(resumed, "dpo")] == list(range(1, out["dpo"]["steps"] + 1))
    assert len(events(resumed, "phase2_done")) == 1 and resumed["labels"] == labels


def test_iterative_mode_regenerates_from_the_current_policy(tmp_path):
    cfg = config_from_dict(rlhf_config(tmp_path, mode="iterative", iterations=2, best_of_n=0), "test")
    out = run(cfg, quiet=True)
    win = events(out, "winrate")
    assert [w["label"] for w in win] == ["initial policy", "iteration 1", "tuned policy"]
    assert len(events(out, "labels")) == 2
    steps = [d["step"] for d in events(out, "dpo")]
    assert steps == list(range(1, len(steps) + 1))  # one step count across iterations
    cands = [g for g in events(out, "generation") if g["desc"].startswith("candidates")]
    assert [c["from_cache"] for c in cands] == [False, False]
    assert (tmp_path / "runs" / "rl" / "checkpoints" / "policy-iter1.safetensors").is_file()
    assert "best_of_n" not in out


def test_the_curve_along_dpo_judges_the_kept_policies_by_judge_and_selectors(tmp_path):
    cfg = config_from_dict(rlhf_config(tmp_path, best_of_n=0, curve_every=2), "test")
    out = run(cfg, quiet=True)
    total = out["dpo"]["steps"]
    assert total >= 3  # the planted run labels enough pairs for several points
    curve = out["curve"]
    # step 0 (the initial policy), every second step, and the final policy once
    assert [c["step"] for c in curve] == [0, *range(2, total + 1, 2)] + ([total] if total % 2 else [])
    # the ends are the win rates' initial and tuned policies, their judge verdicts reused
    assert curve[0]["judge"] == out["initial"]["win_rate"] and curve[0]["log_ratio"] == 0.0
    assert curve[-1]["judge"] == out["final"]["win_rate"]
    assert any(abs(c["log_ratio"]) > 1e-6 for c in curve[1:])  # the kept policies moved
    assert all(0 <= c["judge"] <= 1 and 0 <= c["selectors"] <= 1 for c in curve)
    gens = {g["desc"]: g for g in events(out, "generation")}
    # the last point's answers are the tuned policy's (same weights, same seed: from the cache); the kept
    # policies in between are other weights, sampled anew
    assert gens[f"answers (DPO step {curve[-1]['step']})"]["from_cache"]
    assert not gens["answers (DPO step 2)"]["from_cache"]
    logged = events(out, "curve")
    assert [r["step"] for r in logged] == [c["step"] for c in curve]
    assert all(
        len(r["gold"]["scores"]) == len(r["proxy"]["scores"]) == 4 for r in logged
    )  # per prompt, paired
    assert (Path(out["run_dir"]) / "overoptimization.png").stat().st_size > 5_000
    assert "over-optimization" in (Path(out["run_dir"]) / "report.md").read_text()


def test_selectors_from_a_finished_federated_run(tmp_path):
    raw = rlhf_config(tmp_path, name="fed", algorithm="fedbis")
    raw["pipeline"] = "federated"
    with pytest.raises(ConfigError, match=r"rlhf.num_prompts is set, but pipeline=federated"):
        config_from_dict(raw, "test")  # phase 2's settings in a phase-1 run would be ignored
    del raw["rlhf"]
    run(config_from_dict(raw, "test"), quiet=True)
    raw = rlhf_config(tmp_path, name="rl2", selectors_from=str(tmp_path / "runs" / "fed"), best_of_n=0)
    out = run(config_from_dict(raw, "test"), quiet=True)
    assert events(out, "selectors")[0]["names"] == ["selector-0"]
    assert "phase1" not in out and not events(out, "round")
    with pytest.raises(FileNotFoundError, match="neither a round"):
        raw["rlhf"]["selectors_from"] = str(tmp_path / "nowhere")
        run(config_from_dict(raw, "test"), quiet=True, overwrite=True)


def test_selectors_from_a_finished_centralized_run(tmp_path):
    raw = rlhf_config(tmp_path, name="central")
    raw["pipeline"] = "centralized"
    raw["train"]["steps"] = 3
    del raw["federated"], raw["rlhf"]
    run(config_from_dict(raw, "test"), quiet=True)
    trained, _ = read_adapter(tmp_path / "runs" / "central" / "checkpoints" / "selector.safetensors")
    raw = rlhf_config(tmp_path, name="rl3", selectors_from=str(tmp_path / "runs" / "central"), best_of_n=0)
    out = run(config_from_dict(raw, "test"), quiet=True)
    assert events(out, "selectors")[0]["names"] == ["selector"]
    assert "phase1" not in out and events(out, "labels")
    from fedbiscuit.rlhf.phase2 import load_selectors

    loaded = load_selectors(tmp_path / "runs" / "central")
    assert list(loaded) == ["selector"]
    assert all(torch.equal(loaded["selector"][k], v) for k, v in trained.items())


@pytest.mark.parametrize("method,reset", [("feddpo", True), ("feddpo", False), ("fedsft", True)])
def test_baselines_train_the_policy_through_the_engine(tmp_path, monkeypatch, method, reset):
    raw = rlhf_config(tmp_path, algorithm="fedbis", method=method, judge={"kind": "hf"})
    raw["federated"].update(checkpoint_every=2, reset_optimizer=reset)
    out = run(config_from_dict(raw, "test"), quiet=True)
    rounds = events(out, "round")
    assert len(rounds) == 4 and all(len(r["clients"]) == 2 for r in rounds)
    assert all(r["lr"] == pytest.approx(raw["rlhf"]["dpo"]["lr"]) for r in rounds)  # the policy's rate
    assert out["dpo"]["steps"] == 4
    assert out["judge"] == "the untuned base model" and "best_of_n" not in out
    state, _ = read_adapter(out["policy_checkpoint"])
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)
    # resumed from its round-2 checkpoint (as if stopped after it): rounds 2 and 3 are redone once, and the
    # policy ends bit for bit where the uninterrupted run's did (the clients' kept AdamW states included)
    checkpoints = list_checkpoints(Path(out["run_dir"]) / "checkpoints")
    assert [load_checkpoint(c).round for c in checkpoints] == [2, 4]
    assert bool(load_checkpoint(checkpoints[-1]).optimizer_states) is (not reset)
    checkpoints[-1].unlink()
    checkpoints[-1].with_suffix(".optim.pt").unlink(missing_ok=True)
    from fedbiscuit.rlhf.baselines import PolicyClient

    trained = []  # the client of each local training the resumed run does
    original = PolicyClient.train

    def counted(self, *args, **kwargs):
        trained.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PolicyClient, "train", counted)
    again = run(config_from_dict(raw, "test"), quiet=True, resume=True)
    assert len(trained) == 2 * 2  # rounds 2 and 3, 2 clients each: rounds 0 and 1 are not trained again
    assert [r["round"] for r in events(again, "round")] == [0, 1, 2, 3]
    assert [w["label"] for w in events(again, "winrate")] == ["initial policy", "tuned policy"]
    assert len(events(again, "phase2_done")) == 1
    assert again["dpo"]["loss"] == out["dpo"]["loss"]
    resumed, _ = read_adapter(again["policy_checkpoint"])
    assert resumed.keys() == state.keys() and all(torch.equal(resumed[k], v) for k, v in state.items())


@pytest.mark.parametrize("method", ["selectors", "feddpo"])
def test_evaluation_prompts_are_never_prompts_the_policy_trained_on(tmp_path, method):
    from types import SimpleNamespace

    from fedbiscuit.data.pairs import Comparison
    from fedbiscuit.rlhf.phase2 import choose_prompts

    def pair(prompt):
        return Comparison(prompt, "yes", "no", 1.0, "c", "test")

    shared = [f"q{i}" for i in range(10)]  # in a client's training pairs and in the evaluation split
    data = SimpleNamespace(
        all_train=lambda: [pair(q) for q in shared],
        all_test=lambda: {"c": [pair(q) for q in [*shared, "fresh"]]},
    )
    extra = {} if method == "selectors" else {"method": method, "judge": {"kind": "hf"}}
    cfg = config_from_dict(rlhf_config(tmp_path, num_prompts=2, eval_prompts=20, **extra), "test")
    train, evals, _ = choose_prompts(SimpleNamespace(cfg=cfg, data=data))
    assert len(train) == 2 and not set(train) & set(evals)
    # the selectors path's policy saw only its 2 prompts; a baseline's policy trained on every client pair
    assert sorted(evals) == (
        sorted(set(shared) - set(train) | {"fresh"}) if method == "selectors" else ["fresh"]
    )


def test_policy_clients_send_only_adapter_tensors_and_numbers(tmp_path):
    from fedbiscuit.config import LoraSettings
    from fedbiscuit.data import prepare_data
    from fedbiscuit.models.adapters import adapter_state, add_adapter
    from fedbiscuit.models.tiny import tiny_model
    from fedbiscuit.rlhf.baselines import POLICY, PolicyClient

    cfg = config_from_dict(rlhf_config(tmp_path, method="feddpo", judge={"kind": "hf"}), "test")
    data = prepare_data(cfg.data)
    model, tok = tiny_model()
    model = add_adapter(model, POLICY, LoraSettings(r=4, alpha=8))
    client = PolicyClient(0, next(iter(data.clients.values())), tok, cfg, sft=False)
    reply = client.train(model, adapter_state(model, POLICY), cfg.train, 2, seed=0)
    assert all(isinstance(v, torch.Tensor) and v.is_floating_point() for v in reply.state.values())
    assert all(isinstance(v, float) for v in reply.metrics.values())
    assert isinstance(reply.num_samples, int) and reply.num_samples > 0


def test_phase2_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"rlhf.best_of_n=6 must be 0 \(off\) or a power of 2.*try 4 or 8"):
        config_from_dict(rlhf_config(tmp_path, best_of_n=6), "test")
    raw = rlhf_config(tmp_path, iterations=3)
    with pytest.raises(ConfigError, match="rlhf.iterations"):
        config_from_dict(raw, "test")
    with pytest.raises(ConfigError, match="rlhf.curve_every=4 needs rlhf.method=selectors"):
        config_from_dict(rlhf_config(tmp_path, method="fedsft", curve_every=4, judge={"kind": "hf"}), "test")
    raw = rlhf_config(tmp_path, dpo={"beta": 0})
    with pytest.raises(ConfigError, match="beta"):
        config_from_dict(raw, "test")
    # the run's own phase-1 selector is never the default judge: a selector judge needs its checkpoint
    with pytest.raises(ConfigError, match="rlhf.judge.kind=selector needs rlhf.judge.checkpoint"):
        config_from_dict(rlhf_config(tmp_path, judge={"kind": "selector"}), "test")
    with pytest.raises(ConfigError, match="rlhf.judge.kind=phase1 .* rlhf.method=feddpo"):
        config_from_dict(rlhf_config(tmp_path, method="feddpo"), "test")
    with pytest.raises(ConfigError, match="rlhf.judge.checkpoint is read by kind=selector only"):
        config_from_dict(rlhf_config(tmp_path, judge={"kind": "hf", "checkpoint": "x.safetensors"}), "test")
    raw = rlhf_config(tmp_path)
    raw["pipeline"] = "federated"  # phase 1 alone never judges: its rlhf defaults need no judge
    del raw["rlhf"]
    config_from_dict(raw, "test")


def test_an_hf_judge_on_another_model_reads_with_its_own_tokenizer(tmp_path, monkeypatch):
    """judge.kind=hf with judge.model: a second causal LM, loaded with its own tokenizer, judges on the full path."""
    from fedbiscuit.rlhf import judges

    batches = []

    def recorded(model, encoder, encoded, choice_ids, batch_size, **kw):
        batches.append(batch_size)
        return score_pairs(model, encoder, encoded, choice_ids, batch_size, **kw)

    score_pairs = judges.score_pairs
    monkeypatch.setattr(judges, "score_pairs", recorded)
    raw = rlhf_config(tmp_path, method="feddpo", judge={"kind": "hf", "model": "tiny"}, best_of_n=0)
    raw["eval"]["batch_size"] = 3
    out = run(config_from_dict(raw, "test"), quiet=True)
    assert out["judge"] == "tiny, untuned"
    initial, tuned = events(out, "winrate")
    assert initial["label"] == "initial policy" and tuned["label"] == "tuned policy"
    assert tuned["judge"] == "tiny" and tuned["prompts"] == 4 and tuned["unparsed"] == 0
    assert tuned["wins"] + tuned["losses"] + tuned["ties"] + tuned["identical"] == 4
    assert out["final"]["win_rate"] == tuned["win_rate"]
    assert batches and set(batches) == {3}  # the judge scores in eval.batch_size batches


def test_selectors_from_brings_their_own_adapter_shape_and_template(tmp_path):
    """Phase 2 reads the selectors with the LoRA and selector settings they were trained with (as peft's
    from_pretrained reads an adapter's config); a setting that contradicts them is an error naming it."""
    raw = rlhf_config(tmp_path, name="central")
    raw["pipeline"] = "centralized"
    raw["train"]["steps"] = 2
    raw["model"]["lora"] = {"r": 6, "alpha": 12, "dropout": 0.0, "target_modules": ["q_proj", "k_proj"]}
    raw["selector"]["max_length"] = 80
    del raw["federated"], raw["rlhf"]
    run(config_from_dict(raw, "test"), quiet=True)
    phase2 = rlhf_config(
        tmp_path, name="rl_shape", selectors_from=str(tmp_path / "runs" / "central"), best_of_n=0
    )
    del phase2["model"]["lora"], phase2["selector"]["max_length"]  # the defaults: r=8 on q/v, 512
    out = run(config_from_dict(phase2, "test"), quiet=True)
    used = yaml.safe_load((Path(out["run_dir"]) / "config.yaml").read_text())
    assert used["model"]["lora"]["r"] == 6 and used["model"]["lora"]["target_modules"] == ["q_proj", "k_proj"]
    assert used["selector"]["max_length"] == 80 and events(out, "labels")
    phase2["model"]["lora"] = {"r": 4}
    with pytest.raises(
        ValueError, match=r"model.lora.r=4, but the selectors in .*central were trained with 6"
    ):
        run(config_from_dict(phase2, "test"), quiet=True, overwrite=True)
