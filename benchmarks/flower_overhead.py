"""Per-round overhead of the Flower engine against the local engine, and bytes on the wire per client.

One config (planted preferences, the tiny model, FedBis, 3 clients all sampled, 2 local steps) runs on:
- the local engine (one process, clients in turn);
- the Flower ServerApp + ClientApps in one process (InProcessGrid: every message serialised as Flower does);
- a loopback deployment: flower-superlink + 3 flower-supernode processes on 127.0.0.1, `flwr run`.
Overhead = round wall time - the clients' own training time (sum for the sequential engines, the slowest
client for the parallel SuperNodes). Bytes on the wire are the Flower object payloads of each message (HTTP
and TLS framing excluded), measured for the tiny model's adapter and for a SmolLM2-135M r=8 q/v adapter.

    OMP_NUM_THREADS=1 python benchmarks/flower_overhead.py              # all three, ~3 min on 2 busy cores
    OMP_NUM_THREADS=1 python benchmarks/flower_overhead.py --no-loopback
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _cfg(folder: Path, name: str, rounds: int):
    from fedbiscuit.config import config_from_dict
    from fedbiscuit.data.synthetic import planted_run_config

    raw = planted_run_config(
        folder, name, clients=3, rounds=rounds, clients_per_round=3, checkpoint_every=100
    )
    raw["federated"]["flower"] = {"reply_timeout_s": 120}
    return config_from_dict(raw)


def _rounds(run_dir: Path, parallel: bool) -> dict:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r["event"] == "round"]
    wall = [r["seconds"] for r in rounds]
    train = [
        max(c["seconds"] for c in r["clients"]) if parallel else sum(c["seconds"] for c in r["clients"])
        for r in rounds
    ]
    sent = [r for r in records if r["event"] == "messages" and r["kind"] == "train"]
    down = [b for r in sent for b in r["down_bytes"].values()]
    up = [b for r in sent for b in r["up_bytes"].values()]
    handler = [c["handler_seconds"] for r in rounds for c in r["clients"] if "handler_seconds" in c]
    return {
        "handler_s": statistics.mean(handler) if handler else None,
        "rounds": len(rounds),
        "wall_s": statistics.mean(wall),
        "train_s": statistics.mean(train),
        "overhead_s": statistics.mean(w - t for w, t in zip(wall, train, strict=True)),
        "down_bytes": statistics.mean(down) if down else None,
        "up_bytes": statistics.mean(up) if up else None,
    }


def local(folder: Path, rounds: int) -> dict:
    from fedbiscuit.pipeline import run_federated

    cfg = _cfg(folder, "local", rounds)
    run_federated(cfg, quiet=True)
    return _rounds(cfg.run_dir, parallel=False)


def inprocess(folder: Path, rounds: int) -> dict:
    from fedbiscuit.flower.inprocess import run_inprocess

    cfg = _cfg(folder, "inprocess", rounds)
    run_inprocess(cfg, [{"partition-id": i, "num-partitions": 3} for i in range(3)])
    return _rounds(cfg.run_dir, parallel=False)


def loopback(folder: Path, rounds: int) -> dict:
    from fedbiscuit.flower import deploy

    cfg = _cfg(folder, "loopback", rounds)
    app = deploy.write_app(folder / "app", cfg)
    port = deploy.free_port()
    home = deploy.write_flwr_config(folder / "flwr-home", f"127.0.0.1:{port}").parent
    bin_dir = Path(sys.executable).parent
    env = {
        "FLWR_HOME": str(home),
        "OMP_NUM_THREADS": "1",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    with deploy.Processes(folder / "logs", env) as procs:
        procs.start("superlink", deploy.superlink_args(port, host="127.0.0.1"))
        deploy.wait_for_port(port)
        for i in range(3):
            config = {"partition-id": i, "num-partitions": 3}
            procs.start(f"node-{i}", deploy.supernode_args(f"127.0.0.1:{port}", config, deploy.free_port()))
        start = time.perf_counter()
        subprocess.run(
            [str(bin_dir / "flwr"), "run", str(app), "fedbiscuit", "--stream"],
            env=procs.env,
            check=True,
            timeout=900,
            capture_output=True,
        )
        total = time.perf_counter() - start
    out = _rounds(cfg.run_dir, parallel=True)
    out["run_s"] = total
    return out


def smollm2_bytes() -> dict:
    """Wire bytes of one train request and its reply for the SmolLM2-135M r=8 q/v adapter (no model needed)."""
    from fedbiscuit.federated.client import TrainReply
    from fedbiscuit.flower import messages as m
    from fedbiscuit.flower.inprocess import server_task_identity

    server_task_identity()
    shapes = {
        "q_proj.lora_A": (8, 576),
        "q_proj.lora_B": (576, 8),
        "v_proj.lora_A": (8, 576),
        "v_proj.lora_B": (192, 8),
    }
    state = {
        f"base_model.model.model.layers.{i}.self_attn.{k}.weight": torch.randn(s)
        for i in range(30)
        for k, s in shapes.items()
    }
    config = json.dumps(_cfg(Path(tempfile.mkdtemp()), "x", 1).model_dump(mode="json"))
    down = m.Message(m.train_content(config, "selector-0", state, 1, 0), 1, m.TRAIN)
    reply = TrainReply(state, 100, {"loss": 0.5, "accuracy": 0.5, "pairs_seen": 16.0, "seconds": 1.0})
    up = m.Message(m.train_reply_content(reply), 1, m.TRAIN)
    return {
        "adapter_bytes": sum(t.numel() * 4 for t in state.values()),
        "down_bytes": m.wire_bytes(down),
        "up_bytes": m.wire_bytes(up),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--no-loopback", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="flower-overhead-"))
    results = {
        "local engine": local(folder, args.rounds),
        "Flower in-process": inprocess(folder, args.rounds),
    }
    if not args.no_loopback:
        results["Flower loopback (3 SuperNodes)"] = loopback(folder, args.rounds)
    print(
        "| engine | rounds | round wall time (s) | clients' training (s) | overhead / round (s) "
        "| ClientApp handler (s) | down / client / round | up / client / round |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        kb = lambda b: "-" if b is None else f"{b / 1000:.1f} kB"  # noqa: E731
        seconds = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        print(
            f"| {name} | {r['rounds']} | {r['wall_s']:.2f} | {r['train_s']:.2f} | {r['overhead_s']:.2f} "
            f"| {seconds(r['handler_s'])} "
            f"| {kb(r['down_bytes'])} | {kb(r['up_bytes'])} |"
        )
    s = smollm2_bytes()
    print(
        f"\nSmolLM2-135M r=8 q/v adapter ({s['adapter_bytes']:,} bytes): train request {s['down_bytes']:,} bytes, "
        f"reply {s['up_bytes']:,} bytes on the wire per client per round"
    )


if __name__ == "__main__":
    main()
