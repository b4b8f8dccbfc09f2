"""The command line end to end, on fixture data in the upstream HH layout and the tiny model."""

import json
import math
import re

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fedbiscuit.cli import app
from fedbiscuit.federated.checkpoint import load_checkpoint
from tests.fixtures import hh_row, write_hh

runner = CliRunner()


@pytest.fixture
def hh_root(tmp_path):
    root = tmp_path / "data" / "hh-rlhf"
    for subset, good in (
        ("harmless-base", "I can't help with that."),
        ("helpful-base", "Sure, here is how."),
    ):
        bad = "Sure, here is how." if good.startswith("I can't") else "I can't help with that."
        for split, n in (("train", 24), ("test", 8)):
            rows = [hh_row(f"{subset} {split} question {i}?", good, bad) for i in range(n)]
            write_hh(root, subset, split, [*rows, hh_row("dup", "same", "same")])
    return root.parent


@pytest.fixture
def config(tmp_path, hh_root):
    path = tmp_path / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "tiny-run",
                "output_dir": str(tmp_path / "runs"),
                "data": {
                    "source": "hh_rlhf",
                    "root": str(hh_root),
                    "subsets": ["harmless-base", "helpful-base"],
                },
                "model": {
                    "name_or_path": "tiny",
                    "device": "cpu",
                    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                },
                "train": {"lr": 1e-3, "steps": 4, "batch_size": 4},
            }
        )
    )
    return path


def test_data_lists_clients_and_drops(config):
    result = runner.invoke(app, ["data", str(config)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "harmless-base" in result.output and "helpful-base" in result.output
    assert "identical responses: 2" in result.output  # one per subset in train
    assert "kept 48 pairs" in result.output


def test_data_names_a_client_left_with_no_training_pairs(tmp_path):
    rows = [
        {"prompt": p, "chosen": "a", "rejected": "b", "user": u}
        for p, u in (("lonely 0", "u1"), ("lonely 1", "u1"), ("lonely 3", "u2"))  # "lonely 3" is held out
    ]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "g.yaml"
    data = {"source": "generic", "root": str(tmp_path / "d"), "eval_split": None, "heldout_fraction": 0.25}
    path.write_text(yaml.safe_dump({"data": {**data, "columns": {"client": "user"}}}))
    result = runner.invoke(app, ["data", str(path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())  # rich wraps long lines
    assert "u2 (skipped)" in out and "held-out pairs of clients with no training pairs: 1" in out
    assert "no training pairs (all their pairs fell in the held-out slice): u2" in out


def test_run_writes_the_run_folder_and_eval_reproduces_it(config, tmp_path):
    result = runner.invoke(app, ["run", str(config), "train.steps=3", "--quiet"], terminal_width=200)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tiny-run"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["steps"] == 3 and resolved["model"]["name_or_path"] == "tiny"
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["data", "eval"] and kinds[-2:] == ["eval", "paired"] and "train_done" in kinds
    after = events[-2]
    paired = events[-1]
    assert paired["n"] == 16 and paired["after"] == pytest.approx(after["overall"]["agreement"])
    assert paired["before"] == pytest.approx(events[1]["overall"]["agreement"])
    assert set(after["clients"]) == {"harmless-base", "helpful-base"} and after["overall"]["n"] == 16
    assert (run / "checkpoints" / "selector.safetensors").is_file() and (run / "run.log").is_file()

    result = runner.invoke(app, ["eval", str(config), "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["overall"]["agreement"] == pytest.approx(after["overall"]["agreement"])
    assert report["overall"]["brier"] == pytest.approx(after["overall"]["brier"], abs=1e-6)


def test_cached_centralized_run_reports_the_paired_test_and_a_heldout_curve(config, tmp_path):
    """The cached path end to end: the store is built once, a second run finds every pair, and the run folder
    holds the learning curve on the held-out slice and the paired test on the evaluation split."""
    args = [
        "run",
        str(config),
        "selector.path=cached",
        "model.lora.top_layers=1",
        f"selector.cache_dir={tmp_path / 'trunk'}",
        "data.heldout_fraction=0.25",
        "train.steps=4",
        "eval.heldout_every=2",
        "--quiet",
        "--overwrite",
    ]
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())  # rich wraps lines
    assert "on the same 16 test pairs" in flat and "McNemar" in flat
    run = tmp_path / "runs" / "tiny-run"
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    curve = [e for e in events if e["event"] == "heldout"]
    assert [e["step"] for e in curve] == [0, 2, 4] and [e["pairs_seen"] for e in curve] == [0, 8, 16]
    heldout_n = curve[0]["n"]
    assert heldout_n > 0 and all(e["n"] == heldout_n for e in curve)
    done = next(e for e in events if e["event"] == "train_done")
    train_n = sum(next(e for e in events if e["event"] == "data")["clients"].values())
    assert done["trunk_cache"]["built"] == train_n + heldout_n + 16  # every pair once, then found
    (store,) = (tmp_path / "trunk").iterdir()
    assert len(json.loads((store / "index.json").read_text())) == train_n + heldout_n + 16

    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    again = next(e for e in events if e["event"] == "train_done")["trunk_cache"]
    assert again["built"] == 0 and again["found"] > 0


def test_bad_override_is_a_clear_error(config):
    result = runner.invoke(app, ["run", str(config), "train.lrr=1"])
    assert result.exit_code == 2
    assert "train.lrr" in result.output and "Traceback" not in result.output


def test_missing_data_is_a_clear_error(config, tmp_path):
    result = runner.invoke(app, ["data", str(config), f"data.root={tmp_path / 'nowhere'}"])
    assert result.exit_code == 2 and "not found" in result.output


def test_eval_without_checkpoint_is_a_clear_error(config):
    result = runner.invoke(app, ["eval", str(config), "--quiet"])
    assert result.exit_code == 2 and "selector.safetensors" in result.output


def test_the_whole_method_runs_from_the_cli_and_explains_its_numbers(config, tmp_path):
    overrides = [
        "pipeline=rlhf",
        "train.steps=100",  # the default: the fixture's steps=4 sizes a centralized run, refused here
        "federated.algorithm=fedbiscuit",
        "federated.rounds=3",
        "federated.clients_per_round=2",
        "federated.local_steps=1",
        "federated.fedbiscuit.num_selectors=2",
        "federated.fedbiscuit.warmup_rounds=1",
        "federated.fedbiscuit.regroup_every=1",
        "federated.fedbiscuit.grouping_pairs=2",
        "eval.before_training=false",
        "rlhf.num_prompts=4",
        "rlhf.eval_prompts=4",
        "rlhf.generation.max_new_tokens=6",
        "rlhf.dpo.batch_size=2",
        "rlhf.best_of_n=2",
        "rlhf.best_of_n_prompts=2",
        "rlhf.judge.kind=phase1",  # by name: the run has no independent judge, and says so
        f"model.cache_dir={tmp_path / 'cache'}",
        "selector.path=cached",  # as the quickstart: labelling and grouping on cached trunk states
        "model.lora.top_layers=1",
        "--quiet",
    ]
    result = runner.invoke(app, ["run", str(config), *overrides], terminal_width=200)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "labelled" in out and "by the first candidate" in out
    assert "initial policy" in out and "tuned policy" in out and "best-of-2 probe" in out
    assert "best-of-n curve, judge / selectors: n=1 " in out
    assert "How to read this" in out and "NOT independent" in out
    run = tmp_path / "runs" / "tiny-run"
    assert {p.name for p in run.iterdir()} >= {
        "config.yaml",
        "metrics.jsonl",
        "run.log",
        "report.md",
        "checkpoints",
    }
    assert (run / "winrate.png").stat().st_size > 5_000 and (run / "dpo.png").stat().st_size > 5_000
    assert "## Phase 2" in (run / "report.md").read_text()
    checkpoints = {p.name for p in (run / "checkpoints").iterdir()}
    assert {"round-000003.safetensors", "policy-iter0.safetensors", "policy.safetensors"} <= checkpoints
    phase1 = load_checkpoint(run / "checkpoints" / "round-000003.safetensors")
    assert phase1.round == 3 and sorted(phase1.selectors) == ["selector-0", "selector-1"]
    assert set(phase1.clusters) == {"harmless-base", "helpful-base"}

    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    by_kind: dict[str, list[dict]] = {}
    for e in events:
        by_kind.setdefault(e["event"], []).append(e)
    # phase 1: three rounds of two clients, one grouping (K=2, W=1: at round 2), two scored pairs per client
    assert [r["round"] for r in by_kind["round"]] == [0, 1, 2]
    assert all(len(r["clients"]) == 2 and not r["rejected"] for r in by_kind["round"])
    assert [r["warmup"] for r in by_kind["round"]] == [True, True, False]
    (grouping,) = by_kind["grouping"]
    assert grouping["round"] == 2 and set(grouping["assignment"]) == {"harmless-base", "helpful-base"}
    assert all(set(row) == {"selector-0", "selector-1"} for row in grouping["losses"].values())
    # phase 2: 4 prompts x 2 candidates -> one pair each; every pair labelled, undecided, or identical
    (labels,) = by_kind["labels"]
    assert labels["pairs"] + labels["undecided"] + labels["identical"] == 4
    assert labels["first_won"] + labels["second_won"] == labels["pairs"] >= 1
    done = by_kind["phase2_done"][-1]
    assert done["dpo"]["steps"] == math.ceil(labels["pairs"] / 2)  # one epoch of micro-batches of 2
    assert by_kind["dpo"][-1]["step"] == done["dpo"]["steps"]
    assert 0.0 <= done["dpo"]["reward_accuracy"] <= 1.0
    initial, final = by_kind["winrate"]
    assert (initial["label"], final["label"]) == ("initial policy", "tuned policy")
    for w in (initial, final):
        assert w["prompts"] == 4 and w["wins"] + w["losses"] + w["ties"] == 4
        assert w["win_rate"] == pytest.approx((w["wins"] + 0.5 * w["ties"]) / 4)
    (best,) = by_kind["best_of_n"]
    assert best["n"] == 2 and best["prompts"] == 2 and best["pick_vs_reference"]["prompts"] == 2
    assert done["final"]["win_rate"] == final["win_rate"] and done["best_of_n"] == {
        k: v for k, v in best.items() if k not in ("event", "time")
    }


def test_seen_unseen_and_personalised_clients_side_by_side_in_the_summary_and_the_report(tmp_path):
    from fedbiscuit.data.synthetic import planted_run_config

    raw = planted_run_config(
        tmp_path,
        "pop",
        clients=10,
        algorithm="fedbiscuit",
        rounds=6,
        clients_per_round=4,
        local_steps=3,
        personalize_steps=4,
        fedbiscuit={"num_selectors": 2, "warmup_rounds": 2, "regroup_every": 2},
    )
    raw["data"]["unseen_clients"] = ["client-2", "client-5"]
    path = tmp_path / "pop.yaml"
    path.write_text(yaml.safe_dump(raw))

    listed = runner.invoke(app, ["data", str(path)], terminal_width=200)
    assert listed.exit_code == 0, listed.output
    assert (
        "client-2 (unseen)" in listed.output
        and "held out of training (unseen): client-2, client-5" in listed.output
    )

    result = runner.invoke(app, ["run", str(path), "--quiet"], terminal_width=250)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "sides with the human raters" in out  # the one-sentence verdict stays
    cells = [re.split(r"\s{2,}", line.strip()) for line in out.splitlines()]
    rows = {c[0]: c[1:] for c in cells if len(c) == 9 and c[0].startswith(("seen", "unseen"))}
    assert list(rows) == [
        "seen (own)",
        "unseen (joined)",
        "unseen (vote)",
        "seen personalised",
        "unseen personalised",
    ]
    assert [r[:2] for r in rows.values()] == [["8", "48"], ["2", "12"], ["2", "12"], ["8", "48"], ["2", "12"]]
    # each unseen client joined the selector of its planted group: served as well as the seen clients
    assert rows["seen (own)"][2] == rows["unseen (joined)"][2] == "100.0"
    assert "worst client: seen (own) client-" in out
    assert "unseen clients joined selector-" in out and "personalising 4 steps, seen clients:" in out

    run = tmp_path / "runs" / "pop"
    report = runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "rep")], terminal_width=250)
    assert report.exit_code == 0, report.output
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "## Per client: seen and unseen clients" in text and "![per client](per_client.png)" in text
    for row in (
        "| pop | seen | own | 8 | 48 | 100.0% |",
        "| pop | unseen | joined | 2 | 12 | 100.0% |",
        "| pop | unseen | vote | 2 | 12 |",
        "| pop | seen personalised | 4 steps | 8 | 48 |",
        "| pop | unseen personalised | 4 steps | 2 | 12 |",
    ):
        assert row in text
    assert (tmp_path / "rep" / "per_client.png").stat().st_size > 5_000


def test_a_centralized_run_reports_its_unseen_clients(config):
    result = runner.invoke(
        app,
        ["run", str(config), "train.steps=2", "data.unseen_clients=[helpful-base]", "--quiet"],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    # trained on harmless-base alone (refusals win), the selector sides against every helpful-base judgment;
    # helpful-base's 30 pairs: 22 of its 24 training-split pairs (2 are its labelled slice) and its 8 test pairs
    assert "unseen clients (never trained): 0.0% of 30 pairs" in flat
    assert (
        "1 with >= 5 pairs: mean over clients 0.0%, worst 0.0% (helpful-base), p10 0.0%, spread 0.0%" in flat
    )
    assert "seen clients, 1 with >= 5 pairs: mean over clients 100.0%, worst 100.0% (harmless-base)" in flat
    assert "helpful-base" not in flat.split("unseen clients")[0]  # neither trained nor among the seen clients


def test_the_summary_calls_only_a_round_0_evaluation_before_training(capsys):
    from fedbiscuit import cli

    def ev(round_, agreement):
        rep = {
            "overall": {"agreement": agreement, "n": 100, "ci95": (agreement - 0.1, agreement + 0.1)},
            "clients": {"a": {"agreement": agreement, "n": 100}},  # a report logged before fairness figures
        }
        return {"round": round_, "selectors": {"selector-0": rep}}

    results = {"rounds": 60, "final": ev(60, 0.524), "clusters": None, "faults": {}, "run_dir": "r"}
    cli._federated_summary({**results, "first": ev(20, 0.502)})  # evaluated along the way, not before
    out = capsys.readouterr().out
    assert "before training" not in out and "50.2%" not in out and "52.4%" in out
    cli._federated_summary({**results, "first": ev(0, 0.490)})
    assert "49.0% before training" in capsys.readouterr().out


def test_a_launcher_trains_the_selector_one_process_trains(config, tmp_path):
    """Two processes started by a launcher (gloo on the CPU): the same checkpoint as one process, one run folder."""
    import os
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    pytest.importorskip("accelerate")
    args = ["train.batch_size=5", "train.grad_accum=2", "train.steps=3", "--quiet", "--overwrite"]
    single = runner.invoke(app, ["run", str(config), "name=one", *args], terminal_width=200)
    assert single.exit_code == 0, single.output
    with socket.socket() as s:  # a free port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # torch's launcher (accelerate launch --cpu starts one process; on GPUs `accelerate launch --multi_gpu`
    # sets the same environment)
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        "-m",
        "fedbiscuit.cli",
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}

    def launched(path, *more):
        return subprocess.run(
            [*launch, "run", str(path), *more], capture_output=True, text=True, env=env, timeout=600
        )

    def same_checkpoint(a, b, name):
        one, two = (load_file(tmp_path / "runs" / r / "checkpoints" / name) for r in (a, b))
        assert one.keys() == two.keys() and any((v != 0).any() for k, v in one.items() if "lora_B" in k)
        for key in one:
            # float sums in another order (halves, then across processes), through a few Adam steps
            torch.testing.assert_close(two[key], one[key], atol=2e-5, rtol=1e-4)

    done = launched(config, "name=two", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    same_checkpoint("one", "two", "selector.safetensors")
    assert done.stdout.count("selector agreement") == 1  # rank 0 alone reports
    runs = tmp_path / "runs"
    events = [json.loads(line) for line in (runs / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [e["processes"] for e in events if e.get("event") == "train_done"] == [2]
    federated = launched(config, "name=fed", "pipeline=federated", "train.steps=100", "--quiet")
    said = " ".join((federated.stdout + federated.stderr).split())  # rich wraps lines
    assert federated.returncode != 0 and "a federated run (pipeline: federated) spreads its clients" in said

    # phase 2 on the finished selector: generation and DPO split across the processes, the same policy
    raw = yaml.safe_load(config.read_text())
    # a phase-2 run on finished selectors trains none: phase 1's settings are refused there (config.py)
    del raw["train"]
    config = tmp_path / "p2.yaml"
    config.write_text(yaml.safe_dump(raw))
    p2 = [
        "pipeline=rlhf",
        f"rlhf.selectors_from={runs / 'one'}",
        "rlhf.num_prompts=6",
        "rlhf.eval_prompts=3",
        "rlhf.best_of_n=0",
        "rlhf.judge.kind=phase1",
        "rlhf.generation.max_new_tokens=6",
        "rlhf.generation.batch_size=2",
        "rlhf.dpo.batch_size=2",
        "rlhf.dpo.epochs=2",
        "rlhf.dpo.lr=1e-3",
        "--quiet",
        "--overwrite",
    ]
    single = runner.invoke(app, ["run", str(config), "name=p2one", *p2], terminal_width=200)
    assert single.exit_code == 0, single.output
    done = launched(config, "name=p2two", *p2)
    assert done.returncode == 0, done.stdout + done.stderr
    same_checkpoint("p2one", "p2two", "policy.safetensors")
    unfinished = launched(config, "name=p2x", "pipeline=rlhf", "rlhf.judge.kind=phase1", "--quiet")
    said = " ".join((unfinished.stdout + unfinished.stderr).split())
    assert unfinished.returncode != 0 and "rlhf.selectors_from set" in said
