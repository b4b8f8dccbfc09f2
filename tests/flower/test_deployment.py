"""A real deployment on 127.0.0.1: SuperLink with TLS and SuperNode authentication, 3 SuperNodes, `flwr run`.

Certificates and node keys are made by the test. A SuperNode with an unregistered key is refused. One
SuperNode is SIGKILLed while it trains in round 0: the round ends without it, and the node is restarted as a
supervisor (systemd's Restart=on-failure) would. With authentication its key maps to the same node id, which
the SuperLink lets back in only once it has declared the old connection dead (2 missed 30 s heartbeats, the
moment round 0 gets its "Node Unavailable" reply); round 1 waits up to rejoin_wait_s for it and it trains
again. Every process is stopped in a finally block; each wait is bounded. About 2 min on 2 busy cores (each
message starts a ClientApp process that imports torch).
"""

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fedbiscuit
from fedbiscuit.config import config_from_dict
from fedbiscuit.data.synthetic import planted_run_config
from fedbiscuit.federated.checkpoint import list_checkpoints, load_checkpoint
from fedbiscuit.flower import deploy

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(
    not (BIN / "flower-superlink").exists(), reason="flower-superlink is not installed beside python"
)
REPLY_TIMEOUT = 60  # > a round's normal time (~20 s here: 3 ClientApp processes importing torch on ~1 core)


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            out.append(json.loads(line))
    return out


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not happen within {timeout:g} s")


def _clientapps(pid: int) -> set[int]:
    out = set()
    for child in deploy.descendants(pid):
        try:
            if b"flwr-clientapp" in Path(f"/proc/{child}/cmdline").read_bytes():
                out.add(child)
        except OSError:
            pass
    return out


def test_tls_authenticated_fedbiscuit_survives_a_killed_supernode(tmp_path):
    raw = planted_run_config(
        tmp_path,
        "deployed",
        clients=3,
        algorithm="fedbiscuit",
        rounds=2,
        clients_per_round=3,
        fedbiscuit={"num_selectors": 2, "warmup_rounds": 1, "regroup_every": 1},
    )
    # 2 MB (more than SmolLM2's 1.84 MB adapter) echoed through the SuperLink to every node before round 0
    raw["federated"]["flower"] = {
        "reply_timeout_s": REPLY_TIMEOUT,
        "wait_for_nodes_s": 90,
        "check_transport_mb": 2,
        "rejoin_wait_s": 60,
    }
    cfg = config_from_dict(raw)
    app = deploy.write_app(tmp_path / "app", cfg)
    certs = deploy.make_certificates(tmp_path / "certs", ["127.0.0.1", "localhost"])
    keys = [deploy.make_node_key(tmp_path / "certs", f"node-{i}") for i in range(3)]
    port = deploy.free_port()
    home = deploy.write_flwr_config(tmp_path / "flwr-home", f"127.0.0.1:{port}", certs["ca"]).parent
    env = {
        "FLWR_HOME": str(home),
        "OMP_NUM_THREADS": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(fedbiscuit.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    }

    def node(i: int) -> list[str]:
        config = {"partition-id": i, "num-partitions": 3, "data-root": str(tmp_path / "data")}
        return deploy.supernode_args(
            f"127.0.0.1:{port}", config, runtime_port=deploy.free_port(), ca=certs["ca"], key=keys[i][0]
        )

    run_dir = tmp_path / "runs" / "deployed"
    started = []
    procs = deploy.Processes(tmp_path / "logs", env)
    try:
        link = procs.start("superlink", deploy.superlink_args(port, host="127.0.0.1", certs=certs, auth=True))
        started.append(link.pid)
        deploy.wait_for_port(port, timeout=30)
        for _, public in keys:
            reg = subprocess.run(
                [BIN / "flwr", "supernode", "register", str(public), "fedbiscuit"],
                env=procs.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert reg.returncode == 0 and "registered successfully" in reg.stdout, reg.stdout + reg.stderr
        rogue_key, _ = deploy.make_node_key(tmp_path / "certs", "rogue")
        rogue_args = node(0)
        rogue_args[rogue_args.index("--auth-supernode-private-key") + 1] = str(rogue_key)
        rogue = procs.start("rogue", rogue_args)
        started.append(rogue.pid)
        for i in range(3):
            started.append(procs.start(f"node-{i}", node(i)).pid)
        _wait(lambda: rogue.poll() is not None, 60, "the unregistered SuperNode being refused")
        assert rogue.returncode != 0 and "Failed to activate SuperNode" in procs.log("rogue")
        flwr_run = procs.start("flwr-run", [str(BIN / "flwr"), "run", str(app), "fedbiscuit", "--stream"])

        # SIGKILL node 2 while its round-0 ClientApp trains, then restart it (same key, so same node id)
        _wait(lambda: any(r["event"] == "data" for r in _records(run_dir)), 120, "the start of round 0")
        before = _clientapps(procs.procs["node-2"].pid)
        _wait(lambda: _clientapps(procs.procs["node-2"].pid) - before, 60, "node 2 starting its round-0 work")
        procs.kill("node-2")
        deadline = time.monotonic() + 2 * REPLY_TIMEOUT
        while (
            time.monotonic() < deadline
        ):  # restart until it stays up (exit 305 while the old one counts as alive)
            restarted = procs.start("node-2", node(2))
            started.append(restarted.pid)
            try:
                restarted.wait(timeout=10)
            except subprocess.TimeoutExpired:
                break  # it is up
            time.sleep(5)

        _wait(lambda: flwr_run.poll() is not None, 3 * REPLY_TIMEOUT + 90, "the end of the run")
        assert flwr_run.returncode == 0, procs.log("flwr-run")[-3000:]
    finally:
        procs.stop_all()
    leftovers = [p for p in started if Path(f"/proc/{p}").exists() and deploy._alive(p)]
    assert not leftovers, f"processes left running: {leftovers}"

    records = _records(run_dir)
    check = next(r for r in records if r["event"] == "transport_check")
    assert check["payload_bytes"] >= 2_000_000 and set(check["clients"].values()) == {"identical"}
    rounds = [r for r in records if r["event"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert set(rounds[0]["rejected"]) == {"client-2"}
    # the SuperLink's "Node Unavailable" error reply, or the server's own reply timeout, whichever is first
    assert any(s in rounds[0]["rejected"]["client-2"] for s in ("Node Unavailable", "no reply within"))
    assert len(rounds[0]["clients"]) == 2  # the round went on with the others
    assert rounds[1]["rejected"] == {} and len(rounds[1]["clients"]) == 3  # the restarted node is back
    train = [r for r in records if r["event"] == "messages" and r["kind"] == "train"]
    lora_bytes = sum(
        t.numel() * 4
        for t in load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
        .selectors["selector-0"]
        .values()
    )
    for r in train:
        for up in r["up_bytes"].values():
            assert lora_bytes < up < lora_bytes + 20_000  # the adapter plus a few KB of metadata
    final = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    assert final.round == 2 and all(
        torch.isfinite(v).all() for s in final.selectors.values() for v in s.values()
    )
