"""FedBiscuit's two design choices, measured on planted preferences with the tiny model (cheap, CPU):
assignment (optimal; the reference's greedy, which keeps the first askers in a shuffled order; our greedy
variant that keeps the lowest-loss askers) and selector update (plain mean vs the reference code's
theta += (1/N) * sum of deltas after the first grouping). Reports, over several seeds, each client's
own-cluster agreement at the end and how well the clusters recover the two planted groups (adjusted Rand
index).

    python benchmarks/fedbiscuit_choices.py --seeds 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter
from math import comb
from pathlib import Path

import torch


def ari(a, b) -> float:
    n = len(a)
    s_ij = sum(comb(v, 2) for v in Counter(zip(a, b, strict=True)).values())
    s_a = sum(comb(v, 2) for v in Counter(a).values())
    s_b = sum(comb(v, 2) for v in Counter(b).values())
    expected, top = s_a * s_b / comb(n, 2), (s_a + s_b) / 2
    return 1.0 if top == expected else (s_ij - expected) / (top - expected)


def run(seed: int, assignment: str, update: str, args) -> tuple[float, float]:
    from fedbiscuit.config import config_from_dict
    from fedbiscuit.data.synthetic import planted_run_config
    from fedbiscuit.pipeline import run_federated

    raw = planted_run_config(
        Path(tempfile.mkdtemp()),
        "x",
        seed=seed,
        lr=args.lr,
        noise=args.noise,
        clients=args.clients,
        algorithm="fedbiscuit",
        rounds=args.rounds,
        clients_per_round=4,
        local_steps=3,
        eval_every=args.rounds,
        checkpoint_every=args.rounds,
        fedbiscuit={
            "num_selectors": 2,
            "warmup_rounds": 2,
            "regroup_every": 2,
            "assignment": assignment,
            "update": update,
        },
    )
    raw["eval"]["batch_size"] = 32  # as measured in BENCHMARKS.md
    cfg = config_from_dict(raw)
    result = run_federated(cfg, quiet=True)
    names = sorted(result["clusters"])
    truth = [int(n.split("-")[1]) % 2 for n in names]
    return result["final"]["own"]["overall"]["agreement"], ari(truth, [result["clusters"][n] for n in names])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--noise", type=float, default=0.2)
    p.add_argument("--assignments", nargs="+", default=["optimal", "greedy", "greedy_lowest_loss"])
    p.add_argument("--updates", nargs="+", default=["mean", "paper"])
    args = p.parse_args()
    torch.set_num_threads(1)
    print(
        f"planted preferences: {args.clients} clients in 2 opposite groups, {100 * args.noise:.0f}% of each client's "
        f"labels flipped, K=2, W=2, G=2, {args.rounds} rounds, 4 clients/round, 3 local steps, lr {args.lr}; "
        f"tiny Llama; seeds 0..{args.seeds - 1}"
    )
    print("| assignment | update | own-cluster agreement (mean, min) | ARI (mean, min) |")
    print("|---|---|---|---|")
    start = time.perf_counter()
    for assignment in args.assignments:
        for update in args.updates:
            res = [run(s, assignment, update, args) for s in range(args.seeds)]
            agree, aris = [r[0] for r in res], [r[1] for r in res]
            print(
                f"| {assignment} | {update} | {100 * statistics.mean(agree):.1f}%, {100 * min(agree):.1f}% | "
                f"{statistics.mean(aris):.2f}, {min(aris):.2f} |",
                flush=True,
            )
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
