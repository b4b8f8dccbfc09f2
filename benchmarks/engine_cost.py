"""Cost of the local engine with SmolLM2: round wall time against the clients' pure training time, peak RSS
for K=1 against K=5 selectors, and bytes a client uploads per round against the base model's size.

Each K runs in its own subprocess (so peak RSS is its own) on HH-RLHF clients from ../shared/data.

    python benchmarks/engine_cost.py            # SmolLM2, K=1 and K=5
    python benchmarks/engine_cost.py --model tiny --rounds 6
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(k: int, args) -> dict:
    from fedbiscuit.config import config_from_dict
    from fedbiscuit.pipeline import run_federated

    out = Path(tempfile.mkdtemp(prefix="engine-cost-"))
    fed = {
        "algorithm": "fedbiscuit",
        "rounds": args.rounds,
        "clients_per_round": 2,
        "local_steps": 1,
        "eval_every": 10_000,
        "checkpoint_every": 10_000,
        "fedbiscuit": {"num_selectors": k, "warmup_rounds": 1, "regroup_every": 2, "grouping_pairs": 2},
    }
    cfg = config_from_dict(
        {
            "name": f"k{k}",
            "output_dir": str(out),
            "pipeline": "federated",
            "data": {
                "source": "hh_rlhf",
                "root": args.data,
                "max_train_pairs_per_client": 64,
                "max_eval_pairs_per_client": 2,
                "partition": {"split_each": 2},
            },
            "model": {"name_or_path": args.model, "device": "cpu", "dtype": "float32"},
            "selector": {"max_length": args.max_length},
            "train": {"lr": 1e-4, "batch_size": 2},
            "eval": {"batch_size": 8, "before_training": False},
            "federated": fed,
        }
    )
    run_federated(cfg, quiet=True)
    peak_mb = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )  # before the size probe below loads a model
    records = [json.loads(x) for x in (out / f"k{k}" / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r["event"] == "round"]
    uploads = [c["upload_bytes"] for r in rounds for c in r["clients"]]
    from fedbiscuit.models.loading import load_model

    model, _ = load_model(cfg.model)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "k": k,
        "round_s": sum(r["seconds"] for r in rounds),
        "client_s": sum(r["client_seconds"] for r in rounds),
        "peak_rss_mb": peak_mb,
        "upload_bytes": max(uploads),
        "model_bytes": model_bytes,
        "rounds": len(rounds),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded")
    p.add_argument(
        "--data", default=os.environ.get("FEDBISCUIT_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    )
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.k:
        print(json.dumps(one(args.k, args)))
        return
    rows = []
    for k in (1, 5):
        res = subprocess.run(
            [sys.executable, __file__, "--k", str(k), *sys.argv[1:]], capture_output=True, text=True
        )
        if res.returncode:
            sys.exit(f"K={k} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(
        f"model={args.model} rounds={args.rounds} clients/round=2 local_steps=1 batch=2 pairs max_length={args.max_length}"
    )
    print(
        "| K | rounds | round wall time (s) | clients' training time (s) | engine overhead | peak RSS (MB) | upload / client / round | base model |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        over = r["round_s"] / r["client_s"] - 1
        print(
            f"| {r['k']} | {r['rounds']} | {r['round_s']:.1f} | {r['client_s']:.1f} | {100 * over:+.1f}% | "
            f"{r['peak_rss_mb']:.0f} | {r['upload_bytes'] / 1e6:.2f} MB | {r['model_bytes'] / 1e6:.0f} MB "
            f"({100 * r['upload_bytes'] / r['model_bytes']:.2f}%) |"
        )
    print(f"peak RSS K=5 vs K=1: {100 * (rows[1]['peak_rss_mb'] / rows[0]['peak_rss_mb'] - 1):+.1f}%")


if __name__ == "__main__":
    main()
