"""How the engines scale with the number of clients: round wall time, grouping-round time and peak memory for
16 / 64 / 256 clients, 8 sampled per round (tiny model, planted preferences, FedBiscuit K=2).

Expected: a training round costs the same whatever N (8 clients train), a grouping round grows linearly in N
(every client scores every selector), and memory stays flat (one shared model; a client is its pairs).

Each (engine, N) runs in its own subprocess so its peak memory is its own. Peak RSS is sampled every 50 ms
over the whole process tree (the simulation's Ray workers are separate processes), and ru_maxrss of the
driver is printed beside it.

    python benchmarks/population.py                                   # local engine, 16 / 64 / 256
    python benchmarks/population.py --engines local simulation        # also Flower's simulation (needs ray)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _tree_rss_mb(pid: int) -> float:
    from fedbiscuit.flower.deploy import descendants

    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue  # the process ended between listing and reading
    return total / 1024


class PeakSampler(threading.Thread):
    """The largest RSS summed over this process and its descendants, sampled every ``every`` seconds."""

    def __init__(self, every: float = 0.05):
        super().__init__(daemon=True)
        self.every, self.peak, self._halt = every, 0.0, threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, _tree_rss_mb(os.getpid()))
            self._halt.wait(self.every)

    def stop(self) -> float:
        self._halt.set()
        self.join()
        return max(self.peak, _tree_rss_mb(os.getpid()))


def config(n: int, args, out: Path) -> dict:
    from fedbiscuit.data.synthetic import planted_run_config

    w, g = 1, args.regroup_every
    raw = planted_run_config(
        out,
        f"pop{n}",
        seed=0,
        clients=n,
        algorithm="fedbiscuit",
        rounds=args.rounds,
        clients_per_round=args.per_round,
        local_steps=args.local_steps,
        eval_every=10_000,  # the final evaluation only (timed separately)
        checkpoint_every=10_000,
        fedbiscuit={"num_selectors": 2, "warmup_rounds": w, "regroup_every": g, "grouping_pairs": 6},
    )
    raw["eval"]["batch_size"] = 32
    return raw


def one(engine: str, n: int, args) -> dict:
    from fedbiscuit.config import config_from_dict

    sampler = PeakSampler()
    sampler.start()
    out = Path(tempfile.mkdtemp(prefix=f"population-{engine}-{n}-"))
    cfg = config_from_dict(config(n, args, out))
    start = time.perf_counter()
    if engine == "local":
        from fedbiscuit.pipeline import run_federated

        result = run_federated(cfg, quiet=True)
    else:
        from fedbiscuit.flower.simulation import run_simulation

        result = run_simulation(cfg, num_supernodes=n)
    wall = time.perf_counter() - start
    peak = sampler.stop()
    records = [json.loads(x) for x in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r["event"] == "round"]
    groupings = [r for r in records if r["event"] == "grouping"]
    evals = [r for r in records if r["event"] == "eval"]
    return {
        "engine": engine,
        "clients": n,
        "rounds": len(rounds),
        "round_s": statistics.median(r["seconds"] for r in rounds),
        "client_s": statistics.median(r["client_seconds"] for r in rounds),
        "grouping_s": statistics.median(g["seconds"] for g in groupings) if groupings else None,
        "groupings": len(groupings),
        "eval_s": evals[-1]["seconds"] if evals else None,
        "wall_s": wall,
        "tree_peak_mb": peak,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--engines", nargs="+", default=["local"], choices=["local", "simulation"])
    p.add_argument("--per-round", type=int, default=8)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--regroup-every", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--one", nargs=2, metavar=("ENGINE", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args)))
        return
    from fedbiscuit.models.loading import cpu_flags

    flags = " ".join(sorted(f for f in cpu_flags() if "bf16" in f or f == "avx2"))
    print(
        f"tiny model, planted preferences, FedBiscuit K=2 (warm-up 1 round per selector, a grouping every "
        f"{args.regroup_every} rounds on 6 held-out pairs per client), {args.rounds} rounds, {args.per_round} "
        f"clients a round x {args.local_steps} local steps of 4 pairs; {os.cpu_count()} CPUs ({flags}); "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    print(
        "| engine | clients | training round, median (s) | of which clients train (s) | grouping round, median (s) "
        "| final evaluation (s) | whole run (s) | peak RSS, process tree (MB) | ru_maxrss driver (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    rest = [a for a in sys.argv[1:]]
    for engine in args.engines:
        for n in args.sizes:
            res = subprocess.run(
                [sys.executable, __file__, *rest, "--one", engine, str(n)], capture_output=True, text=True
            )
            if res.returncode:
                sys.exit(f"{engine} with {n} clients failed:\n{res.stderr[-3000:]}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            grouping = f"{r['grouping_s']:.2f} ({r['groupings']})" if r["grouping_s"] is not None else "-"
            print(
                f"| {engine} | {n} | {r['round_s']:.2f} | {r['client_s']:.2f} | {grouping} | {r['eval_s']:.1f} | "
                f"{r['wall_s']:.1f} | {r['tree_peak_mb']:.0f} | {r['maxrss_mb']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
