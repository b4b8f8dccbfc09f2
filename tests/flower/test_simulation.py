"""Flower's simulation runtime (Ray) against the local engine, on the same seed and data.

One simulation of 8 virtual SuperNodes (FedBiscuit, K=2, a FedBis warm-up round and two grouping rounds) is
run once for the module: `flwr run` on a SuperLink in simulation mode, the ServerApp and the ClientApp
in 2 Ray actors, each loading the tiny model once. About 35 s on 2 busy cores; the checks that need no Ray
run everywhere.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fedbiscuit.cli import app
from fedbiscuit.config import config_from_dict
from fedbiscuit.data.synthetic import planted_run_config
from fedbiscuit.federated.checkpoint import list_checkpoints, load_checkpoint
from fedbiscuit.flower import client_app, simulation
from fedbiscuit.flower.inprocess import InProcessGrid
from fedbiscuit.flower.server_app import run_server
from fedbiscuit.pipeline import run_federated
from fedbiscuit.runs import RunExistsError

FEDBISCUIT = {
    "algorithm": "fedbiscuit",
    "rounds": 4,
    "clients_per_round": 4,
    "fedbiscuit": {"num_selectors": 2, "warmup_rounds": 1, "regroup_every": 1},
}
CLIENTS = 8


def _records(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _final(run_dir):
    return load_checkpoint(list_checkpoints(Path(run_dir) / "checkpoints")[-1])


def _marked_processes() -> list[int]:
    """Live processes that carry any simulation's marker in their environment."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z" and any(v.startswith(simulation.MARKER.encode() + b"=") for v in env):
                out.append(int(entry.name))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(local engine's summary, the simulation's summary, the command's output): the simulation runs through
    `fedbiscuit flower-sim`, and the summary is what run_simulation returned to it."""
    pytest.importorskip("ray", reason='Ray is not installed: pip install -e ".[simulation]"')
    tmp = tmp_path_factory.mktemp("sim")
    raw = planted_run_config(tmp, "local", clients=CLIENTS, **FEDBISCUIT)
    # two actors whatever the machine: the test's time and memory do not grow with a CI runner's cores
    raw["federated"]["flower"] = {"simulation": {"num_cpus": 2, "cpus_per_client": 1}}
    local = run_federated(config_from_dict(raw), quiet=True)
    path = tmp / "sim.yaml"
    path.write_text(yaml.safe_dump({**raw, "name": "sim"}))
    returned = []
    real = simulation.run_simulation
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            simulation, "run_simulation", lambda *a, **k: returned.append(real(*a, **k)) or returned[0]
        )
        result = CliRunner().invoke(app, ["flower-sim", str(path)])
    assert result.exit_code == 0, result.output
    return local, returned[0], result.output


def test_the_simulation_ends_with_the_local_engines_adapters(runs):
    local, sim, _ = runs
    a, b = _final(local["run_dir"]), _final(sim["run_dir"])
    assert a.round == b.round == 4 and sim["rounds"] == 4 and sim["faults"] == {}
    assert a.clusters == b.clusters == sim["clusters"] and len(set(b.clusters.values())) == 2
    assert a.selectors.keys() == b.selectors.keys()
    for sel, state in a.selectors.items():
        assert state.keys() == b.selectors[sel].keys()
        for k, v in state.items():
            assert (v - b.selectors[sel][k]).abs().max().item() <= 1e-6, (sel, k)
    assert sim["final"]["round"] == local["final"]["round"] == 4


def test_virtual_nodes_hold_the_clients_the_local_engine_has_in_its_order(runs):
    local, sim, _ = runs
    lrec, srec = _records(local["run_dir"]), _records(sim["run_dir"])
    # node i (partition-id=i of num-partitions=8) is the i-th client: same names, same training pairs
    data = [next(r for r in recs if r["event"] == "data")["clients"] for recs in (lrec, srec)]
    assert data[0] == data[1] and len(data[1]) == CLIENTS
    # the same clients sampled in every round (sampling and per-client seeds go by the client's index)
    rounds = [
        [[c["client"] for c in r["clients"]] for r in recs if r["event"] == "round"] for recs in (lrec, srec)
    ]
    assert rounds[0] == rounds[1] and len(rounds[1]) == 4
    grouping = [r for r in srec if r["event"] == "grouping"]
    assert [g["round"] for g in grouping] == [2, 3] and all(len(g["losses"]) == CLIENTS for g in grouping)
    identify = next(r for r in srec if r["event"] == "messages" and r["kind"] == "identify")
    assert len(identify["up_bytes"]) == CLIENTS and identify["failed"] == {}


def test_the_command_prints_the_runs_agreement(runs):
    _, sim, output = runs
    assert "agreement with human labels after 4 rounds" in output and "selector-1" in output
    assert str(Path(sim["run_dir"]) / "flower-sim") in output.replace("\n", "")


def test_it_really_ran_on_rays_actors_and_left_no_process_behind(runs):
    _, sim, _ = runs
    log = (Path(sim["run_dir"]) / "flower-sim" / "flwr-run.log").read_text()
    assert f"({CLIENTS} simulated SuperNodes)" in log
    train = [c for r in _records(sim["run_dir"]) if r["event"] == "round" for c in r["clients"]]
    assert all("handler_seconds" in c for c in train)  # trained by the ClientApp, not the local engine
    assert _marked_processes() == []  # SuperLink, flwr-simulation, Ray's processes and actors: all gone


def test_one_process_serving_many_nodes_holds_one_model_and_no_optimizer(tmp_path):
    # What a Ray actor does: one process answers for many virtual nodes (here all 8, in-process).
    raw = planted_run_config(tmp_path, "cache", clients=CLIENTS, rounds=2, clients_per_round=CLIENTS)
    nodes = [{"partition-id": i, "num-partitions": CLIENTS} for i in range(CLIENTS)]
    try:
        run_server(InProcessGrid(client_app.app, nodes, seed=0), config_from_dict(raw))
        assert len(client_app._WORKSPACES) == 1 and client_app._DATA == {}
        clients = list(client_app._CLIENTS.values())
        assert [c.name for c in clients] == [f"client-{i}" for i in range(CLIENTS)]
        assert all(c.optimizer_state is None for c in clients)
        assert not any(hasattr(c, "model") for c in clients)  # clients borrow the one shared model
    finally:
        client_app.clear_cache()


# ------------------------------------------------------------------------ refused before anything starts
def _cfg(tmp_path, **flower):
    raw = planted_run_config(tmp_path, "refused", clients=4)
    raw["federated"]["flower"] = flower
    return config_from_dict(raw)


def test_more_nodes_than_clients_is_refused(tmp_path):
    pytest.importorskip("ray", reason="the Ray check comes first")
    with pytest.raises(ValueError, match="--supernodes 5: .* yields 4 clients"):
        simulation.run_simulation(_cfg(tmp_path), num_supernodes=5)


@pytest.mark.parametrize(
    ("flower", "device", "message"),
    [
        (
            {"simulation": {"cpus_per_client": 3, "num_cpus": 2}},
            "cpu",
            "cpus_per_client=3 exceeds the 2 cores",
        ),
        ({"simulation": {"gpus_per_client": 0.5}}, "cpu", "gpus_per_client=0.5 reserves GPU"),
        ({}, "cuda", "model.device=cuda, but federated.flower.simulation.gpus_per_client=0"),
        ({"num_clients": 3}, "cpu", "federated.flower.num_clients=3, but the simulation has 4 nodes"),
        (
            {"simulation": {"gpus_per_client": 0.5}},
            "cuda:1",
            "model.device=cuda:1: .* sees the GPU Ray gave it as cuda:0",
        ),
    ],
)
def test_resources_that_cannot_work_are_named(tmp_path, flower, device, message):
    cfg = _cfg(tmp_path, **flower)
    cfg.model.device = device
    with pytest.raises(ValueError, match=message):
        simulation.check_simulation_config(cfg, 4, 4)


def test_an_existing_run_is_refused_before_ray_starts(tmp_path):
    pytest.importorskip("ray", reason="the Ray check comes first")
    cfg = _cfg(tmp_path)
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunExistsError, match="--overwrite"):
        simulation.run_simulation(cfg)
    assert not (cfg.run_dir / "flower-sim").exists()


def test_without_ray_the_error_names_the_extra(tmp_path, monkeypatch):
    real = simulation.importlib.util.find_spec
    monkeypatch.setattr(
        simulation.importlib.util, "find_spec", lambda name: None if name == "ray" else real(name)
    )
    with pytest.raises(simulation.SimulationError, match=r"fedbiscuit\[simulation\]"):
        simulation.run_simulation(_cfg(tmp_path))


def test_bad_simulation_settings_name_their_key():
    with pytest.raises(ValueError, match="cpus_per_client"):
        config_from_dict({"federated": {"flower": {"simulation": {"cpus_per_client": 0}}}})
    with pytest.raises(ValueError, match="gpus_per_client"):
        config_from_dict({"federated": {"flower": {"simulation": {"gpus_per_client": 1.5}}}})


@pytest.mark.skipif(
    os.environ.get("CI") != "true" or sys.platform == "win32",
    reason="CI on Linux installs the simulation extra (flwr has no Ray for Windows on Python 3.13+)",
)
def test_ci_has_ray_so_the_simulation_runs_there_instead_of_skipping():
    import ray  # noqa: F401


def test_the_command_reports_a_failed_simulation_verbatim(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(planted_run_config(tmp_path, "failed", clients=4)))

    def fail(*args, **kwargs):
        raise simulation.SimulationError("the simulation ended finished:failed: [ServerApp] boom")

    monkeypatch.setattr(simulation, "run_simulation", fail)
    result = CliRunner().invoke(app, ["flower-sim", str(path)])
    assert result.exit_code == 2 and "finished:failed: [ServerApp] boom" in result.output


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGHUP"), reason="no SIGHUP on this platform")
@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_terminating_signals_unwind_so_the_started_processes_are_stopped(name):
    import signal

    sig = getattr(signal, name)
    before = signal.getsignal(sig)
    with pytest.raises(SystemExit) as stop, simulation._terminate_unwinds():
        os.kill(os.getpid(), sig)
    assert stop.value.code == 128 + sig and signal.getsignal(sig) == before  # handler restored afterwards


def test_auto_device_without_gpu_share_says_the_actors_run_on_the_cpu(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    cfg.model.device = "auto"
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    note = simulation.simulation_device_note(cfg)
    assert note is not None and "none of this machine's 2 GPU(s) and run on the CPU" in note
    cfg.federated.flower.simulation.gpus_per_client = 0.5
    assert simulation.simulation_device_note(cfg) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg.federated.flower.simulation.gpus_per_client = 0.0
    assert simulation.simulation_device_note(cfg) is None  # no GPU here: nothing to say
