"""benchmarks/paired_runs.py on two tiny finished runs with planted preferences (even clients prefer "yes", odd
ones "no"): one FedBis selector cannot serve both groups, FedBiscuit's two clusters can."""

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fedbiscuit.config import config_from_dict
from fedbiscuit.data.synthetic import planted_run_config
from fedbiscuit.pipeline import run_centralized, run_federated

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "paired_runs.py"


def _run(folder: Path, algorithm: str, seed: int, lr: float = 1e-2, **data) -> Path:
    raw = planted_run_config(
        folder,
        f"{algorithm}_s{seed}",
        seed=seed,
        lr=lr,
        noise=0.1,
        test_pairs=12,
        algorithm=algorithm,
        rounds=8,
        clients_per_round=4,
        local_steps=3,
        eval_every=8,
        checkpoint_every=8,
        # FedBiscuit's settings only where they are read (config.py refuses them with another algorithm)
        **(
            {"fedbiscuit": {"num_selectors": 2, "warmup_rounds": 2, "regroup_every": 2}}
            if algorithm == "fedbiscuit"
            else {}
        ),
    )
    raw["data"]["max_eval_pairs_per_client"] = 12
    raw["data"].update(data)
    raw["name"] += "".join(f"_{k}{v}" for k, v in data.items())
    raw["eval"]["heldout_every"] = 8  # the held-out agreement --split heldout checks itself against
    return Path(run_federated(config_from_dict(raw), quiet=True)["run_dir"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("paired")
    return {(a, s): _run(folder, a, s) for a in ("fedbis", "fedbiscuit") for s in (0, 1)}


def _script(*args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    """The script in a fresh process; its outcome cache in ``cache``, by default a fresh folder (nothing cached)."""
    env = {**os.environ, "FEDBISCUIT_CACHE": str(cache or tempfile.mkdtemp())}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, env=env
    )


def test_paired_comparison_of_two_runs_and_their_pool(runs, tmp_path):
    out = tmp_path / "paired.json"
    args = []
    for s in (0, 1):
        args += ["--compare", str(runs["fedbis", s]), str(runs["fedbiscuit", s])]
    done = _script(*args, "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert len(result["comparisons"]) == 2
    for comp in result["comparisons"]:
        base, other = comp["runs"]
        for run in (base, other):  # scored again, the last checkpoint gives what the run logged
            assert run["agreement"] == pytest.approx(run["logged"], abs=1e-6)
        overall = comp["comparison"]["overall"]
        assert overall["n"] == 8 * 12
        assert overall["before"] == pytest.approx(base["agreement"], abs=1e-6)
        assert overall["after"] == pytest.approx(other["agreement"], abs=1e-6)
        assert overall["difference"] == pytest.approx(overall["after"] - overall["before"], abs=1e-6)
        lo, hi = overall["ci95"]
        assert lo <= overall["difference"] <= hi
        # the planted split: FedBiscuit's own clusters serve both groups, one FedBis selector only one
        assert overall["difference"] > 0.2 and lo > 0 and overall["mcnemar_p"] < 0.05
        per_client = [v for k, v in comp["comparison"].items() if k != "overall"]
        assert sum(v["n"] for v in per_client) == overall["n"]
        for v in [overall, *per_client]:  # each run's own interval holds its agreement
            for side in ("before", "after"):
                lo, hi = v[f"{side}_ci95"]
                assert 0 <= lo <= v[side] <= hi <= 1
    pooled = result["pooled"]["overall"]
    mean_diff = sum(c["comparison"]["overall"]["difference"] for c in result["comparisons"]) / 2
    assert pooled["difference"] == pytest.approx(mean_diff, abs=1e-6)
    assert "mcnemar_p" not in pooled  # one outcome per pair is what McNemar needs; a pooled pair has two
    # pooled by arm: the run names without their seed; the sign test of the per-pair mean differences
    (pool,) = result["pools"]
    assert (pool["baseline"], pool["other"], pool["seeds"]) == ("fedbis", "fedbiscuit", 2)
    assert 0 < pooled["sign_p"] < 0.05 and pooled["gained"] > pooled["lost"]

    # the same pool from the saved outcomes, nothing scored again
    again = tmp_path / "again.json"
    done = _script("--reuse", str(out), "--json", str(again))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "agreement" not in done.stdout  # no run was scored
    assert json.loads(again.read_text())["pooled"]["overall"] == pooled
    # a JSON written with --reuse holds the comparisons it reused: reusing both counts each seed once
    done = _script("--reuse", str(out), "--reuse", str(again), "--json", str(again))
    assert done.returncode == 0, done.stderr[-2000:]
    twice = json.loads(again.read_text())
    assert len(twice["comparisons"]) == 2 and twice["pools"][0]["seeds"] == 2
    assert twice["pooled"]["overall"] == pooled


def test_each_pair_of_arms_pools_over_its_own_seeds(runs, tmp_path):
    out = tmp_path / "paired.json"
    args = []
    for s in (0, 1):
        args += ["--compare", "untrained", str(runs["fedbis", s])]
        args += ["--compare", str(runs["fedbis", s]), str(runs["fedbiscuit", s])]
    done = _script(*args, "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    pools = {(p["baseline"], p["other"]): p for p in result["pools"]}
    assert set(pools) == {("untrained", "fedbis"), ("fedbis", "fedbiscuit")} and "pooled" not in result
    for (base, other), pool in pools.items():
        mine = [c for c in result["comparisons"] if Path(c["other"]).name.startswith(other + "_s")]
        mine = [c for c in mine if (c["baseline"] == "untrained") == (base == "untrained")]
        mean = sum(c["comparison"]["overall"]["difference"] for c in mine) / len(mine)
        assert pool["seeds"] == 2 and pool["pooled"]["overall"]["difference"] == pytest.approx(mean, abs=1e-6)


def test_seeds_of_one_arm_trained_differently_are_not_pooled(runs, tmp_path):
    """Each comparison says what its two runs were trained with differently (read from their configs), and two
    seeds of one arm whose training settings differ beyond the seed are not pooled: the pool would mix recipes."""
    odd = _run(tmp_path, "fedbis", 1, lr=3e-3)  # "fedbis_s1" by name, another rate
    out = tmp_path / "paired.json"
    done = _script(
        "--compare", str(runs["fedbis", 0]), str(runs["fedbiscuit", 0]),
        "--compare", str(odd), str(runs["fedbiscuit", 1]),
        "--compare", "untrained", str(runs["fedbis", 0]),
        "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "federated.algorithm fedbis -> fedbiscuit" in done.stdout
    said = [line for line in done.stdout.splitlines() if "trained with" in line]
    assert len(said) == 2 and not any("seed" in line for line in said)  # none for the untrained selector
    assert "train.lr 0.003 -> 0.01" in said[1]
    assert "not pooled: fedbiscuit against fedbis" in done.stdout and "train.lr 0.01 / 0.003" in done.stdout
    result = json.loads(out.read_text())
    assert result["pools"] == []
    assert result["comparisons"][2]["settings"]["baseline"] is None  # the untrained selector: nothing to read
    # the JSON keeps each run's settings, so a later --reuse refuses the same pool
    again = _script("--reuse", str(out), "--json", str(tmp_path / "again.json"))
    assert again.returncode == 0 and "not pooled" in again.stdout, again.stderr[-2000:]
    # seeds trained alike pool as before
    same = _script(
        "--compare", str(runs["fedbis", 0]), str(runs["fedbiscuit", 0]),
        "--compare", str(runs["fedbis", 1]), str(runs["fedbiscuit", 1]),
        cache=tmp_path / "cache",
    )  # fmt: skip
    assert same.returncode == 0 and "pooled over 2 seeds" in same.stdout, same.stderr[-2000:]


def test_settings_that_do_not_change_training_are_not_compared(tmp_path, monkeypatch):
    """How often a run logs, evaluates or checkpoints decides nothing it learns: two seeds differing only there
    still pool; a rate does not."""
    import importlib

    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # the script and its neighbour common.py
    script = importlib.import_module(SCRIPT.stem)
    raw = planted_run_config(tmp_path, "a", rounds=2)
    settings = []
    for lr, every in ((raw["train"]["lr"], 2), (raw["train"]["lr"], 1), (3e-3, 2)):
        one = copy.deepcopy(raw)
        one["train"]["lr"] = lr
        one["federated"]["eval_every"] = one["federated"]["checkpoint_every"] = every
        settings.append(script.training_settings(config_from_dict(one)))
    assert "train.lr" in settings[0] and "federated.rounds" in settings[0]
    assert not {"federated.eval_every", "federated.checkpoint_every", "train.log_every", "seed"} & set(
        settings[0]
    )
    assert script.settings_differ(settings[:2]) == {}
    assert script.settings_differ(settings) == {"train.lr": [raw["train"]["lr"], raw["train"]["lr"], 3e-3]}
    assert script.settings_differ([None, settings[2]]) == {}  # the untrained selector: nothing to compare


def test_runs_on_different_pairs_are_refused(runs, tmp_path):
    raw = planted_run_config(tmp_path, "fewer", noise=0.1, test_pairs=12, rounds=1, clients_per_round=4)
    raw["data"]["max_eval_pairs_per_client"] = 6
    fewer = Path(run_federated(config_from_dict(raw), quiet=True)["run_dir"])
    done = _script("--compare", str(runs["fedbis", 0]), str(fewer))
    assert done.returncode != 0
    assert "not judged on the same test pairs" in done.stderr and "48 shared" in done.stderr


def test_untrained_against_a_centralized_run(tmp_path):
    """ "untrained" is the run's fresh adapter: it reproduces the run's own "before" evaluation, and the trained
    selector its "after"."""
    raw = planted_run_config(tmp_path, "central", test_pairs=6, clients=4)
    raw["pipeline"] = "centralized"
    raw["federated"] = {"algorithm": "centralized"}
    raw["train"] |= {"epochs": 3, "steps": None}
    raw["eval"] |= {"before_training": True}
    run = Path(run_centralized(config_from_dict(raw), quiet=True)["run_dir"])
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    before = next(r for r in records if r.get("event") == "eval" and r.get("stage") == "before")
    out = tmp_path / "paired.json"
    done = _script("--compare", "untrained", str(run), "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    (comp,) = json.loads(out.read_text())["comparisons"]
    untrained, trained = comp["runs"]
    assert untrained["agreement"] == pytest.approx(before["overall"]["agreement"], abs=1e-6)
    assert trained["agreement"] == pytest.approx(trained["logged"], abs=1e-6)
    assert comp["comparison"]["overall"]["n"] == 4 * 6

    # a federated run on the same test pairs, with other data and eval settings, pairs with it by content
    fed = planted_run_config(tmp_path, "fed", test_pairs=6, clients=4, rounds=2)
    fed["data"]["heldout_fraction"] = 0.2
    fed_run = Path(run_federated(config_from_dict(fed), quiet=True)["run_dir"])
    done = _script("--compare", str(run), str(fed_run), "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    (comp,) = json.loads(out.read_text())["comparisons"]
    central, federated = comp["runs"]
    assert comp["comparison"]["overall"]["n"] == 4 * 6
    assert central["agreement"] == pytest.approx(trained["agreement"], abs=1e-6)
    assert federated["agreement"] == pytest.approx(federated["logged"], abs=1e-6)


def test_the_local_baseline_is_judged_by_each_clients_own_selector(runs, tmp_path):
    """A local run keeps no clusters (every client trains its own selector): each test pair is judged by its
    client's selector, as the run's own evaluation did, and the planted split is served (one FedBis selector
    serves one group)."""
    local = _run(tmp_path, "local", 0)
    out = tmp_path / "paired.json"
    done = _script("--compare", str(runs["fedbis", 0]), str(local), "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    (comp,) = json.loads(out.read_text())["comparisons"]
    fedbis, own = comp["runs"]
    assert own["agreement"] == pytest.approx(own["logged"], abs=1e-6)
    assert comp["comparison"]["overall"]["n"] == 8 * 12
    assert comp["comparison"]["overall"]["difference"] > 0.2


def test_a_run_scored_once_is_read_from_the_cache_until_its_checkpoint_changes(runs, tmp_path):
    cache = tmp_path / "cache"
    args = ["--compare", str(runs["fedbis", 0]), str(runs["fedbiscuit", 0])]
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    done = _script(*args, "--json", str(first), cache=cache)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("; scored)") == 2
    assert len(list((cache / "paired").glob("*.json"))) == 2
    done = _script(*args, "--json", str(second), cache=cache)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("; scored)") == 0 and done.stdout.count("; from ") == 2
    a, b = (json.loads(f.read_text())["comparisons"][0] for f in (first, second))
    assert a["outcomes"] == b["outcomes"] and a["comparison"] == b["comparison"]

    # a checkpoint written again (here: the same bytes, a new modification time) is scored again
    ckpt = sorted((runs["fedbiscuit", 0] / "checkpoints").iterdir())[-1]
    stat = ckpt.stat()
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    done = _script(*args, cache=cache)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("; scored)") == 1 and done.stdout.count("; from ") == 1
    done = _script(*args, "--no-cache", cache=cache)
    assert done.stdout.count("; scored)") == 2


def test_heldout_split_judges_the_clients_heldout_slices_not_the_test_pairs(runs, tmp_path):
    cache = tmp_path / "cache"
    base, other = str(runs["fedbis", 0]), str(runs["fedbiscuit", 0])
    out = tmp_path / "heldout.json"
    done = _script("--split", "heldout", "--compare", base, other, "--json", str(out), cache=cache)
    assert done.returncode == 0, done.stderr[-2000:]
    (comp,) = json.loads(out.read_text())["comparisons"]
    logged = [json.loads(x) for x in (runs["fedbis", 0] / "metrics.jsonl").read_text().splitlines()]
    (held,) = [r for r in logged if r["event"] == "heldout" and r["round"] == 8]
    n_held = held["selectors"]["selector-0"]["overall"]["n"]
    assert comp["comparison"]["overall"]["n"] == n_held != 8 * 12
    for run in comp["runs"]:  # scored again, the held-out agreement each run logged at its last round
        assert run["agreement"] == pytest.approx(run["logged"], abs=1e-6)
    # the same runs on the test split, from the same cache: scored apart, not read from the held-out entry
    done = _script("--compare", base, other, "--json", str(out), cache=cache)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "scored" in done.stdout
    assert json.loads(out.read_text())["comparisons"][0]["comparison"]["overall"]["n"] == 8 * 12


def test_spare_split_judges_the_training_pairs_the_cap_left_out(runs, tmp_path):
    done = _script("--split", "spare", "--compare", "untrained", str(runs["fedbis", 0]))
    assert done.returncode != 0 and "data.max_train_pairs_per_client left none out" in done.stderr
    for bad in (["--spare-pairs", "0", "--split", "spare"], ["--spare-pairs", "5"]):  # refused, not ignored
        done = _script(*bad, "--compare", "untrained", str(runs["fedbis", 0]))
        assert done.returncode != 0 and "--spare-pairs=" in done.stderr
    folder = tmp_path / "capped"
    base, other = (_run(folder, a, 0, max_train_pairs_per_client=6) for a in ("fedbis", "fedbiscuit"))
    out = tmp_path / "spare.json"
    done = _script(
        "--split", "spare", "--spare-pairs", "3", "--compare", str(base), str(other), "--json", str(out)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (comp,) = json.loads(out.read_text())["comparisons"]
    from fedbiscuit.config import load_config
    from fedbiscuit.data import prepare_data

    cfg = load_config(base / "config.yaml", [])
    data = prepare_data(cfg.data, seed=0)
    spare = [p for c in data.clients.values() for p in c.spare[:3] if p.label != 0.5]
    assert comp["comparison"]["overall"]["n"] == len(spare) > 0
    assert all(run["logged"] is None for run in comp["runs"])  # no run logs an agreement on these pairs
    # the planted split holds on pairs neither training nor grouping read
    assert comp["comparison"]["overall"]["difference"] > 0.2
