"""The local engine end to end on a tiny model and synthetic clients with planted preferences."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fedbiscuit.config import config_from_dict
from fedbiscuit.data.synthetic import planted_run_config
from fedbiscuit.federated import client as client_mod
from fedbiscuit.federated.checkpoint import list_checkpoints, load_checkpoint
from fedbiscuit.federated.client import ScoreReply, SelectorClient, TrainReply
from fedbiscuit.federated.local_engine import TooFewClientsError
from fedbiscuit.pipeline import run_federated


def make_cfg(tmp_path: Path, name="fed", **fed) -> dict:
    return planted_run_config(tmp_path, name, **fed)


def _final(run_dir: Path):
    return load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])


def test_same_seed_same_adapters_bit_for_bit(tmp_path):
    a = run_federated(config_from_dict(make_cfg(tmp_path, "a")), quiet=True)
    b = run_federated(config_from_dict(make_cfg(tmp_path, "b")), quiet=True)
    sa, sb = _final(Path(a["run_dir"])), _final(Path(b["run_dir"]))
    assert sa.round == sb.round == 3
    for k, v in sa.selectors["selector-0"].items():
        assert torch.equal(v, sb.selectors["selector-0"][k]), k
    c = run_federated(config_from_dict({**make_cfg(tmp_path, "c"), "seed": 1}), quiet=True)
    sc = _final(Path(c["run_dir"]))
    assert any(
        not torch.equal(v, sc.selectors["selector-0"][k]) for k, v in sa.selectors["selector-0"].items()
    )


def test_faulty_clients_are_left_out_and_counted(tmp_path, monkeypatch):
    real_train = SelectorClient.train

    def flaky(self, model, state, *args, **kw):
        if self.name == "client-1":
            raise RuntimeError("disk full")
        reply = real_train(self, model, state, *args, **kw)
        if self.name == "client-2":
            reply.state[next(iter(reply.state))][0, 0] = float("nan")
        if self.name == "client-3":
            reply.state = {k + ".x": v for k, v in reply.state.items()}
        return reply

    monkeypatch.setattr(SelectorClient, "train", flaky)
    cfg = config_from_dict(make_cfg(tmp_path, rounds=4, clients_per_round=8, min_clients=2))
    result = run_federated(cfg, quiet=True)
    assert result["faults"] == {"raised RuntimeError": 4, "update does not fit the adapter": 8}
    rounds = [
        json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    ]
    rounds = [r for r in rounds if r["event"] == "round"]
    assert len(rounds) == 4
    for r in rounds:
        assert set(r["rejected"]) == {"client-1", "client-2", "client-3"}
        assert "disk full" in r["rejected"]["client-1"] and "non-finite" in r["rejected"]["client-2"]
        assert len(r["clients"]) == 5
    final = _final(Path(result["run_dir"])).selectors["selector-0"]
    assert all(torch.isfinite(v).all() for v in final.values())


def test_too_few_clients_stops_with_the_checkpoint_intact(tmp_path, monkeypatch):
    real_train = SelectorClient.train
    calls = {"n": 0}

    def dies_later(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] > 6:  # rounds 0 and 1 succeed (3 clients each), round 2 fails entirely
            raise RuntimeError("node lost")
        return real_train(self, *args, **kw)

    monkeypatch.setattr(SelectorClient, "train", dies_later)
    cfg = config_from_dict(make_cfg(tmp_path, rounds=4, min_clients=1))
    with pytest.raises(TooFewClientsError, match="round 2: only 0 of 3"):
        run_federated(cfg, quiet=True)
    ckpts = list_checkpoints(cfg.run_dir / "checkpoints")
    assert [p.name for p in ckpts] == ["round-000001.safetensors", "round-000002.safetensors"]
    assert load_checkpoint(ckpts[-1]).round == 2


def test_clients_send_only_adapter_tensors_and_numbers(tmp_path, monkeypatch):
    sent = []
    for method in ("train", "score"):
        real = getattr(SelectorClient, method)

        def spy(self, *a, _real=real, **kw):
            reply = _real(self, *a, **kw)
            sent.append(reply)
            return reply

        monkeypatch.setattr(SelectorClient, method, spy)
    cfg = config_from_dict(
        make_cfg(
            tmp_path,
            algorithm="fedbiscuit",
            rounds=3,
            fedbiscuit={"num_selectors": 2, "warmup_rounds": 1, "regroup_every": 1},
        )
    )
    run_federated(cfg, quiet=True)
    texts = [
        json.loads(line)["prompt"] for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()
    ]
    assert any(isinstance(r, ScoreReply) for r in sent) and any(isinstance(r, TrainReply) for r in sent)
    for reply in sent:
        if isinstance(reply, TrainReply):
            assert all(t.is_floating_point() for t in reply.state.values())  # no token ids
            assert all(k.startswith("base_model.model.") and "lora_" in k for k in reply.state)
            assert isinstance(reply.num_samples, int)
            assert all(isinstance(v, float) for v in reply.metrics.values())
        else:
            assert all(isinstance(v, float) for v in reply.losses.values())
        blob = pickle.dumps(reply)
        assert not any(t.encode() in blob for t in texts), "a client reply carries its text"


def test_planted_groups_are_recovered(tmp_path):
    from tests.federated.sklearn_free_ari import adjusted_rand_index

    cfg = config_from_dict(
        make_cfg(
            tmp_path,
            algorithm="fedbiscuit",
            rounds=10,
            clients_per_round=4,
            local_steps=3,
            fedbiscuit={"num_selectors": 2, "warmup_rounds": 2, "regroup_every": 2, "assignment": "optimal"},
        )
    )
    result = run_federated(cfg, quiet=True)
    clusters = result["clusters"]
    truth = [int(name.split("-")[1]) % 2 for name in sorted(clusters)]
    found = [clusters[name] for name in sorted(clusters)]
    assert adjusted_rand_index(truth, found) >= 0.9
    assert len(set(found)) == 2


def test_the_oracle_baseline_serves_each_planted_group_with_its_own_selector(tmp_path):
    raw = make_cfg(tmp_path, "oracle", algorithm="oracle", rounds=6, clients_per_round=4, local_steps=3)
    raw["data"]["partition"] = {"method": "natural", "split_each": 2}
    summary = run_federated(config_from_dict(raw), quiet=True)
    state = _final(Path(summary["run_dir"]))
    groups = {c.split("#")[0] for c in state.clusters}
    assert set(state.selectors) == groups and len(groups) >= 2
    assert all(sel == c.split("#")[0] for c, sel in state.clusters.items())
    records = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    trained = [(c["client"], c["selector"]) for r in records if r["event"] == "round" for c in r["clients"]]
    assert trained and all(sel == client.split("#")[0] for client, sel in trained)
    final = [r for r in records if r["event"] == "eval"][-1]
    assert final["own"]["overall"]["agreement"] >= 0.8  # each group's selector learns its planted preference


def test_baselines_run_through_the_engine(tmp_path):
    local = run_federated(
        config_from_dict(make_cfg(tmp_path, "local", algorithm="local", rounds=2)), quiet=True
    )
    state = _final(Path(local["run_dir"]))
    assert sorted(state.selectors) == [f"client-{i}" for i in range(8)]
    central = run_federated(
        config_from_dict(make_cfg(tmp_path, "central", algorithm="centralized", rounds=2)), quiet=True
    )
    rounds = [json.loads(x) for x in (Path(central["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [c["client"] for r in rounds if r["event"] == "round" for c in r["clients"]] == ["all", "all"]


def test_one_shared_model_whatever_the_number_of_selectors(tmp_path, monkeypatch):
    seen = set()
    real = client_mod.SelectorClient.train

    def spy(self, model, *a, **kw):
        seen.add((id(model), tuple(model.peft_config)))
        return real(self, model, *a, **kw)

    monkeypatch.setattr(client_mod.SelectorClient, "train", spy)
    cfg = config_from_dict(
        make_cfg(
            tmp_path,
            algorithm="fedbiscuit",
            rounds=4,
            fedbiscuit={"num_selectors": 3, "warmup_rounds": 1, "regroup_every": 1},
        )
    )
    run_federated(cfg, quiet=True)
    assert seen and len(seen) == 1 and next(iter(seen))[1] == ("selector",)  # one model, one adapter slot


def test_sigkill_then_resume_ends_with_the_uninterrupted_adapters(tmp_path):
    raw = make_cfg(
        tmp_path,
        "killed",
        algorithm="fedbiscuit",
        rounds=8,
        clients_per_round=3,
        fedbiscuit={"num_selectors": 2, "warmup_rounds": 1, "regroup_every": 2},
    )
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "fedbiscuit.cli", "run", str(path), "--quiet"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = tmp_path / "runs" / "killed" / "checkpoints"
    deadline = time.time() + 180
    try:
        while time.time() < deadline and len(list_checkpoints(ckpt_dir)) < 3:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    reached = load_checkpoint(list_checkpoints(ckpt_dir)[-1]).round
    assert 3 <= reached < 8, "the run was not interrupted part-way"
    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = _final(tmp_path / "runs" / "killed")

    whole = run_federated(config_from_dict({**raw, "name": "whole"}), quiet=True)
    expected = _final(Path(whole["run_dir"]))
    assert resumed.round == expected.round == 8 and resumed.clusters == expected.clusters
    for sel, st in expected.selectors.items():
        for k, v in st.items():
            assert torch.equal(v, resumed.selectors[sel][k]), (sel, k)
    rounds = [
        json.loads(x)["round"]
        for x in (tmp_path / "runs" / "killed" / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["event"] == "round"
    ]
    assert rounds == list(range(8))  # replayed rounds are not logged twice


ADAPTIVE = {"server_optimizer": {"name": "adam", "lr": 0.05}}
SCHEDULE = {"schedule": "cosine", "warmup_steps": 3, "min_lr_ratio": 0.1}


@pytest.mark.parametrize(
    ("reset", "server", "schedule", "grouping"),
    [
        (True, {}, {}, "loss"),
        (False, {}, {}, "loss"),
        (True, ADAPTIVE, SCHEDULE, "loss"),
        (True, {"server_optimizer": {"name": "yogi", "lr": 0.01}}, {}, "loss"),
        (True, {}, SCHEDULE, "updates"),
        (True, {}, {}, "gradients"),
    ],
)
def test_resume_from_an_earlier_checkpoint_replays_exactly(tmp_path, reset, server, schedule, grouping):
    raw = make_cfg(
        tmp_path,
        "r",
        algorithm="fedbiscuit",
        rounds=5,
        reset_optimizer=reset,
        fedbiscuit={"num_selectors": 2, "warmup_rounds": 1, "regroup_every": 2, "grouping": grouping},
        **server,
    )
    raw["train"].update(schedule)
    run_federated(config_from_dict(raw), quiet=True)
    ckpts = list_checkpoints(tmp_path / "runs" / "r" / "checkpoints")
    expected = load_checkpoint(ckpts[-1])
    assert bool(expected.optimizer_states) is (not reset)
    # the server optimizer's moments are part of the checkpoint: one state per selector that was updated
    assert set(expected.server_optimizer) == (set(expected.selectors) if server else set())
    for later in ckpts[1:]:  # back to round 3: rounds 3 and 4 are replayed
        later.unlink()
        later.with_suffix(".optim.pt").unlink(missing_ok=True)
    assert load_checkpoint(list_checkpoints(tmp_path / "runs" / "r" / "checkpoints")[-1]).round == 3
    run_federated(config_from_dict(raw), quiet=True, resume=True)
    again = _final(tmp_path / "runs" / "r")
    for sel, st in expected.selectors.items():
        assert all(torch.equal(v, again.selectors[sel][k]) for k, v in st.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU determinism needs a CUDA device")
def test_deterministic_resume_on_cuda_replays_exactly(tmp_path):
    """On CPU resume is always bit-identical; on CUDA it is with deterministic: true."""
    raw = make_cfg(
        tmp_path,
        "gpu",
        algorithm="fedbiscuit",
        rounds=5,
        fedbiscuit={"num_selectors": 2, "warmup_rounds": 1, "regroup_every": 2},
    )
    raw["model"]["device"] = "cuda"
    raw["deterministic"] = True
    try:
        run_federated(config_from_dict(raw), quiet=True)
        ckpts = list_checkpoints(tmp_path / "runs" / "gpu" / "checkpoints")
        expected = load_checkpoint(ckpts[-1])
        for later in ckpts[1:]:
            later.unlink()
        run_federated(config_from_dict(raw), quiet=True, resume=True)
    finally:
        torch.use_deterministic_algorithms(False)
    again = _final(tmp_path / "runs" / "gpu")
    for sel, st in expected.selectors.items():
        assert all(torch.equal(v, again.selectors[sel][k]) for k, v in st.items())


def test_keeping_optimizer_state_changes_training(tmp_path):
    a = run_federated(config_from_dict(make_cfg(tmp_path, "a", rounds=3, clients_per_round=8)), quiet=True)
    b = run_federated(
        config_from_dict(make_cfg(tmp_path, "b", rounds=3, clients_per_round=8, reset_optimizer=False)),
        quiet=True,
    )
    sa, sb = (
        _final(Path(a["run_dir"])).selectors["selector-0"],
        _final(Path(b["run_dir"])).selectors["selector-0"],
    )
    assert any(not torch.equal(v, sb[k]) for k, v in sa.items())


def test_slow_clients_are_timed_out(tmp_path):
    cfg = config_from_dict(make_cfg(tmp_path, client_timeout_s=1e-9))
    with pytest.raises(TooFewClientsError, match="timed out"):
        run_federated(cfg, quiet=True)


def test_resume_refuses_a_changed_config_and_fresh_runs_refuse_to_overwrite(tmp_path):
    from fedbiscuit.runs import RunExistsError

    raw = make_cfg(tmp_path, "x", rounds=1)
    run_federated(config_from_dict(raw), quiet=True)
    with pytest.raises(RunExistsError, match="--resume"):
        run_federated(config_from_dict(raw), quiet=True)
    with pytest.raises(RunExistsError, match=r"train.lr \(0.01 -> 0.02\)"):
        run_federated(
            config_from_dict({**raw, "train": {**raw["train"], "lr": 0.02}}), quiet=True, resume=True
        )
    run_federated(config_from_dict(raw), quiet=True, overwrite=True)


def test_report_plots_and_tables_several_runs(tmp_path):
    from fedbiscuit.report import write_report

    fed = make_cfg(
        tmp_path,
        "fb",
        algorithm="fedbiscuit",
        rounds=4,
        eval_every=2,
        fedbiscuit={"num_selectors": 2, "warmup_rounds": 1, "regroup_every": 1},
    )
    fed["eval"]["before_training"] = True
    run_federated(config_from_dict(fed), quiet=True)
    run_federated(config_from_dict(make_cfg(tmp_path, "fa", rounds=4, eval_every=2)), quiet=True)
    runs = [tmp_path / "runs" / "fb", tmp_path / "runs" / "fa"]
    path = write_report(runs, tmp_path / "cmp")
    text = path.read_text()
    assert "| fb | 4 |" in text and "| fa | 4 |" in text and "own" in text and "selector-0" in text
    for png in ("agreement.png", "clusters.png", "per_client.png"):
        assert (tmp_path / "cmp" / png).stat().st_size > 5_000
    records = [json.loads(x) for x in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    grouping = [r for r in records if r["event"] == "grouping"]
    assert [g["round"] for g in grouping] == [2, 3]
    assert set(grouping[0]["losses"]["client-0"]) == {"selector-0", "selector-1"}
    evals = [r for r in records if r["event"] == "eval"]
    assert [e["round"] for e in evals] == [0, 2, 4] and "vote" in evals[-1] and "own" in evals[-1]


def test_own_cluster_uses_the_partitioned_client_names(tmp_path):
    """With split_each, test pairs belong to 'client-0#1' etc.; each must be judged by its own cluster."""
    raw = make_cfg(
        tmp_path,
        "split",
        algorithm="fedbiscuit",
        rounds=4,
        clients_per_round=4,
        fedbiscuit={"num_selectors": 2, "warmup_rounds": 1, "regroup_every": 1},
    )
    raw["data"]["partition"] = {"split_each": 2}
    raw["data"]["max_eval_pairs_per_client"] = None
    result = run_federated(config_from_dict(raw), quiet=True)
    assert all("#" in name for name in result["clusters"]) and len(result["clusters"]) == 16
    final = result["final"]
    assert set(final["own"]["clients"]) == set(result["clusters"])
    own = final["own"]["overall"]["agreement"]
    per_client = final["own"]["clients"]
    for client, sel in result["clusters"].items():
        assert per_client[client]["agreement"] == pytest.approx(
            final["selectors"][sel]["clients"][client]["agreement"]
        )
    # own-cluster agreement is a mix of the two selectors, not selector-0 alone: both clusters hold clients, and
    # the overall figure is each client's agreement under its own cluster's selector, weighted by its pairs
    assert set(result["clusters"].values()) == {"selector-0", "selector-1"}
    n = {client: per_client[client]["n"] for client in result["clusters"]}
    mixed = sum(
        final["selectors"][sel]["clients"][client]["agreement"] * n[client]
        for client, sel in result["clusters"].items()
    )
    assert own == pytest.approx(mixed / sum(n.values()))


def test_resume_keeps_the_evaluation_taken_at_the_checkpoint(tmp_path):
    raw = make_cfg(tmp_path, "ev", rounds=4, eval_every=2, checkpoint_every=2)
    run_federated(config_from_dict(raw), quiet=True)
    ckpts = list_checkpoints(tmp_path / "runs" / "ev" / "checkpoints")
    ckpts[-1].unlink()  # back to the round-2 checkpoint
    with open(tmp_path / "runs" / "ev" / "metrics.jsonl", "a") as fh:
        fh.write('{"event": "round", "round": 3, "cli')  # a line torn by a kill
    result = run_federated(config_from_dict(raw), quiet=True, resume=True)
    records = [json.loads(x) for x in (tmp_path / "runs" / "ev" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records if r["event"] == "eval"] == [2, 4]
    assert [r["round"] for r in records if r["event"] == "round"] == [0, 1, 2, 3]
    assert result["first"]["round"] == 2 and result["final"]["round"] == 4
    # a finished run resumed again has nothing to do but still reports
    again = run_federated(
        config_from_dict({**raw, "federated": {**raw["federated"], "rounds": 4}}), quiet=True, resume=True
    )
    assert again["final"]["round"] == 4


def test_local_baseline_with_unmatched_evaluation_clients_is_a_clear_error(tmp_path):
    raw = make_cfg(tmp_path, "loc", algorithm="local", rounds=1)
    raw["data"]["partition"] = {"method": "iid", "num_clients": 4}
    with pytest.raises(ValueError, match="local baseline"):
        run_federated(config_from_dict(raw), quiet=True)


def test_a_client_with_no_training_pairs_is_skipped_and_named_in_the_metrics(tmp_path):
    raw = make_cfg(tmp_path, "lonely", rounds=1)
    lonely = json.dumps({"prompt": "lonely 3", "chosen": "yes", "rejected": "no", "client": "client-lonely"})
    for split in ("train", "test"):  # "lonely 3" falls in the 25% held-out slice: nothing left to train on
        with open(tmp_path / "data" / f"{split}.jsonl", "a") as fh:
            fh.write(lonely + "\n")
    result = run_federated(config_from_dict(raw), quiet=True)
    records = [json.loads(x) for x in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    (data,) = [r for r in records if r["event"] == "data"]
    assert "client-lonely" not in data["clients"] and len(data["clients"]) == 8
    assert data["dropped"] == {"held-out pairs of clients with no training pairs": 1}
    assert any(n.endswith("client-lonely") for n in data["notes"])
    assert result["rounds"] == 1


def test_a_federated_run_is_paired_against_its_untrained_selectors(tmp_path):
    """The summary's paired test: the final own-cluster selectors against round 0's untrained ones, on the same
    test pairs, from the per-pair outcomes each evaluation logs."""
    raw = make_cfg(
        tmp_path,
        "paired",
        algorithm="fedbiscuit",
        rounds=6,
        clients_per_round=4,
        local_steps=3,
        eval_every=6,
        fedbiscuit={"num_selectors": 2, "warmup_rounds": 1, "regroup_every": 2},
    )
    raw["eval"]["before_training"] = True
    summary = run_federated(config_from_dict(raw), quiet=True)
    first, final, paired = summary["first"], summary["final"], summary["paired"]
    assert first["round"] == 0 and final["round"] == 6 and paired["measured_by"] == "own"
    assert paired["before"] == pytest.approx(
        first["selectors"]["selector-0"]["overall"]["agreement"], abs=1e-6
    )
    assert paired["after"] == pytest.approx(final["own"]["overall"]["agreement"], abs=1e-6)
    assert paired["n"] == final["own"]["overall"]["n"]
    assert paired["difference"] > 0.2 and paired["ci95"][0] > 0 and paired["mcnemar_p"] < 0.05
    no_start = run_federated(
        config_from_dict({**raw, "name": "nostart", "eval": {"before_training": False}}), quiet=True
    )
    assert no_start["paired"] is None


@pytest.mark.parametrize("grouping", ["updates", "gradients"])
def test_grouping_by_update_directions_recovers_planted_groups(tmp_path, grouping):
    """grouping=updates / gradients: every client trains the selectors' mean for a round (or takes one gradient
    step from it) at each grouping and the clusters follow the directions of their changes; the planted yes/no
    clients pull in opposite directions."""
    from tests.federated.sklearn_free_ari import adjusted_rand_index

    fb = {"num_selectors": 2, "warmup_rounds": 2, "regroup_every": 2, "grouping": grouping}
    raw = make_cfg(
        tmp_path, algorithm="fedbiscuit", rounds=8, clients_per_round=4, local_steps=3, fedbiscuit=fb
    )
    result = run_federated(config_from_dict(raw), quiet=True)
    clusters = result["clusters"]
    truth = [int(name.split("-")[1]) % 2 for name in sorted(clusters)]
    assert adjusted_rand_index(truth, [clusters[n] for n in sorted(clusters)]) >= 0.9
    records = [json.loads(x) for x in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    groupings = [r for r in records if r["event"] == "grouping"]
    assert [g["round"] for g in groupings] == [4, 6]
    for g in groupings:  # no scores: margins of cosine, and no claim of standard errors
        assert g["trusted"] is None and set(g["margins"]) == set(clusters) and g["median_margin"] > 0
    # the probes are not training: the sampled clients' rounds are as many as without them
    assert len([r for r in records if r["event"] == "round"]) == 8
    kept = {**raw, "federated": {**raw["federated"], "reset_optimizer": False}}
    if grouping == "updates":  # its round of AdamW would enter the optimizer state kept across rounds
        with pytest.raises(Exception, match="reset_optimizer=true, or grouping=loss"):
            config_from_dict(kept)
    else:  # a gradient step uses no optimizer
        assert config_from_dict(kept).federated.reset_optimizer is False


def test_heldout_agreement_is_logged_on_the_clients_heldout_slices(tmp_path):
    """eval.heldout_every in a federated run: agreement on every client's held-out slice of the training split
    (what settings are tuned on), at round 0, every N rounds and after the last; never the test pairs."""
    raw = make_cfg(tmp_path, "held", rounds=5, clients_per_round=4, local_steps=3)
    raw["eval"].update(before_training=True, heldout_every=2)
    cfg = config_from_dict(raw)
    summary = run_federated(cfg, quiet=True)
    events = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").open()]
    held = [e for e in events if e["event"] == "heldout"]
    tests = [e for e in events if e["event"] == "eval"]
    assert [e["round"] for e in held] == [0, 2, 4, 5]
    overall = [e["selectors"]["selector-0"]["overall"] for e in held]
    # the held-out slices: a quarter of each client's training pairs, none of its (at most 6) test pairs
    n_held = overall[0]["n"]
    assert all(o["n"] == n_held for o in overall)
    assert n_held != tests[-1]["selectors"]["selector-0"]["overall"]["n"]
    clients = set(held[0]["selectors"]["selector-0"]["clients"])
    assert len(clients) == 8
    # planted preferences are learnable: the held-out curve rises from the untrained start
    assert overall[-1]["agreement"] > overall[0]["agreement"] + 0.2


def test_the_report_plots_and_tables_the_heldout_curve(tmp_path):
    from fedbiscuit.report import summarize, write_report

    raw = make_cfg(tmp_path, "held", rounds=4, local_steps=2)
    raw["eval"].update(before_training=True, heldout_every=3)
    run_dir = Path(run_federated(config_from_dict(raw), quiet=True)["run_dir"])
    held = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    held = [e["selectors"]["selector-0"]["overall"] for e in held if e["event"] == "heldout"]
    curve = summarize(run_dir)["heldout"]
    assert [p[0] for p in curve] == [0, 3, 4]  # rounds, as logged
    assert [p[1] for p in curve] == [o["agreement"] for o in held]
    assert [p[2:] for p in curve] == [(*o["ci95"], o["n"]) for o in held]
    text = write_report([run_dir], tmp_path / "rep").read_text()
    assert f"| {100 * held[-1]['agreement']:.1f}% (round 4, n {held[-1]['n']}) |" in text
    # a run without held-out events gets a dash in that column
    bare = Path(run_federated(config_from_dict(make_cfg(tmp_path, "bare", rounds=2)), quiet=True)["run_dir"])
    assert summarize(bare)["heldout"] == []
    row = next(
        r for r in write_report([bare], tmp_path / "rep2").read_text().splitlines() if r.startswith("| bare")
    )
    assert row.split("|")[9].strip() == "-"
    # a held-out round with no decided pair logs a null agreement: plotted as a gap, tabled as "-"
    from fedbiscuit.report import _agreement_plot

    run = summarize(run_dir)
    run["heldout"] = [*run["heldout"][:-1], (4, None, float("nan"), float("nan"), 0)]
    _agreement_plot([run], tmp_path / "null.png")
    assert (tmp_path / "null.png").stat().st_size > 5_000


def test_heldout_agreement_needs_heldout_slices_and_the_local_engine(tmp_path):
    from fedbiscuit.flower.server_app import check_flower_config

    raw = make_cfg(tmp_path, "noheld")
    raw["eval"]["heldout_every"] = 2
    raw["data"]["heldout_fraction"] = 0.0
    with pytest.raises(ValueError, match=r"eval.heldout_every=2: no client has a held-out slice"):
        run_federated(config_from_dict(raw), quiet=True)
    with pytest.raises(ValueError, match=r"eval.heldout_every=2: the Flower server holds no client"):
        check_flower_config(config_from_dict(raw))


def test_the_agreement_plot_reads_against_the_length_rule_and_a_centralized_selector(tmp_path, monkeypatch):
    """The issue's reference lines: the run logs "the longer answer is better" on its evaluation pairs at the
    start, and the report draws it, and a centralized run's trained selector with its band, beside the rounds."""
    from fedbiscuit import report
    from fedbiscuit.data import prepare_data
    from fedbiscuit.models.loading import load_model
    from fedbiscuit.pipeline import run_centralized
    from fedbiscuit.selector.metrics import length_rule

    raw = make_cfg(tmp_path, "fed", rounds=2, test_pairs=6)
    raw["eval"]["before_training"] = True
    # planted answers are "yes" / "no", one token each: every other test pair gets a longer chosen answer, so
    # the rule wins those and ties the rest (counted half): 75%
    test_file = tmp_path / "data" / "test.jsonl"
    rows = [json.loads(line) for line in test_file.read_text().splitlines()]
    for k, row in enumerate(rows):
        row["chosen"] += " indeed, and here is why" if k % 2 == 0 else ""
    test_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config_from_dict(raw)
    fed = Path(run_federated(cfg, quiet=True)["run_dir"])
    central_raw = {k: v for k, v in raw.items() if k != "federated"}
    central_raw.update(name="central", pipeline="centralized", train={**raw["train"], "steps": 4})
    central = Path(run_centralized(config_from_dict(central_raw), quiet=True)["run_dir"])

    data = prepare_data(cfg.data, seed=cfg.seed)
    _, tok = load_model(cfg.model, seed=cfg.seed)
    expected = length_rule(
        [p for pairs in data.all_test().values() for p in pairs],
        lambda text: len(tok(text, add_special_tokens=False)["input_ids"]),
    )
    assert expected["n"] == len(rows) and expected["agreement"] == 0.75
    for run_dir in (fed, central):
        logged = next(json.loads(line) for line in (run_dir / "metrics.jsonl").open() if '"data"' in line)
        assert logged["length_rule"] == expected
    summaries = {r: report.summarize(r) for r in (fed, central)}
    assert summaries[fed]["central"] is None  # a federated run is a curve, not a reference line
    trained = summaries[central]["central"]
    final = [json.loads(line) for line in (central / "metrics.jsonl").open()]
    final = next(e for e in reversed(final) if e["event"] == "eval")
    assert final["stage"] == "after" and trained["agreement"] == final["overall"]["agreement"]

    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig))
    text = report.write_report([fed, central], tmp_path / "rep").read_text()
    ax = figures[0].axes[0]
    flat = {(line.get_linestyle(), round(line.get_ydata()[0], 6)) for line in ax.lines}
    assert ("-.", round(100 * expected["agreement"], 1)) in flat  # one length line: both runs share the split
    assert sum(line.get_linestyle() == "-." for line in ax.lines) == 1
    (ref,) = [line for line in ax.lines if line.get_label() == "central (centralized, trained)"]
    assert ref.get_ydata()[0] == pytest.approx(100 * trained["agreement"])
    assert ax.xaxis.get_major_locator()._integer
    assert f"agrees {100 * expected['agreement']:.1f}%" in text and "of fed, central" in text
