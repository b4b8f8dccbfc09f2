"""Seen and unseen clients, and the worst-served client, under FedBis, FedBiscuit and FedBis + personalisation
(planted preferences, the tiny model, CPU; a few minutes).

Clients in two opposite planted groups (even clients prefer "yes", odd "no"; --noise of each client's labels
flipped); a share of them (--unseen) is held out of training by the seeded hash of data.unseen_clients, so
each seed holds out other clients. Every client has 24 training pairs and 12 evaluation pairs with prompts of
their own (the planted test split here is not the training split). Seen clients are judged on their 12
evaluation pairs; an unseen client joins a selector on its labelled (held-out) slice and is judged on up to 12
of its other pairs.

- FedBis: the final FedAvg selector. FedBis + personalisation: the same run's copies after --steps local
  steps per client (seen: on its training pairs; unseen: on its labelled slice), on the same pairs.
- FedBiscuit K=2: each client by its own cluster's selector (an unseen client: the one it joined), and the
  vote of the two.

Figures are per seed, then mean +- standard deviation over seeds, and [min, max]. 'worst' is the worst
client's agreement (clients with >= eval.min_client_pairs pairs; every client here has 12 or its whole slice).

    OMP_NUM_THREADS=1 python benchmarks/population_fairness.py --seeds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def run(algorithm: str, seed: int, args) -> dict:
    from fedbiscuit.config import config_from_dict
    from fedbiscuit.data.synthetic import planted_run_config
    from fedbiscuit.pipeline import run_federated

    folder = Path(tempfile.mkdtemp())
    raw = planted_run_config(
        folder,
        algorithm,
        seed=seed,
        lr=args.lr,
        clients=args.clients,
        noise=args.noise,
        test_pairs=12,  # each client's test split: 12 prompts it never trained on
        algorithm=algorithm,
        rounds=args.rounds,
        clients_per_round=4,
        local_steps=3,
        eval_every=args.rounds,
        checkpoint_every=args.rounds,
        personalize_steps=args.steps if algorithm == "fedbis" else 0,
        # FedBiscuit's settings only where they are read (config.py refuses them with another algorithm)
        **(
            {"fedbiscuit": {"num_selectors": 2, "warmup_rounds": 2, "regroup_every": 2}}
            if algorithm == "fedbiscuit"
            else {}
        ),
    )
    raw["data"]["unseen_clients"] = args.unseen
    raw["data"]["max_eval_pairs_per_client"] = 12
    raw["eval"]["batch_size"] = 32
    return run_federated(config_from_dict(raw), quiet=True)


def figures(seen: dict, unseen: dict) -> dict:
    return {
        "seen": seen["overall"]["agreement"],
        "seen worst": seen["fairness"]["worst"],
        "unseen": unseen["overall"]["agreement"],
        "unseen worst": unseen["fairness"]["worst"],
    }


def rows_of(algorithm: str, result: dict) -> dict[str, dict]:
    final, unseen = result["final"], result["unseen"]
    if algorithm == "fedbis":
        p = result["personalized"]
        return {
            "FedBis": figures(final["selectors"]["selector-0"], unseen["own"]),
            f"FedBis + personalisation ({p['steps']} steps)": figures(
                p["seen"]["personalized"], p["unseen"]["personalized"]
            ),
        }
    return {
        "FedBiscuit K=2 (own / joined selector)": figures(final["own"], unseen["own"]),
        "FedBiscuit K=2 (vote of 2)": figures(final["vote"], unseen["vote"]),
    }


def cell(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} +- {100 * sd:.1f} [{100 * min(values):.0f}, {100 * max(values):.0f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--unseen", type=float, default=0.25, help="data.unseen_clients: the share held out")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps", type=int, default=5, help="federated.personalize_steps")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--noise", type=float, default=0.1)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(
        f"planted preferences: {args.clients} clients in 2 opposite groups, {100 * args.noise:.0f}% of each "
        f"client's labels flipped; {100 * args.unseen:.0f}% of clients unseen; {args.rounds} rounds, 4 "
        f"clients/round, 3 local steps, lr {args.lr}; FedBiscuit K=2, W=2, G=2; tiny Llama; seeds 0..{args.seeds - 1}"
    )
    start = time.perf_counter()
    table: dict[str, list[dict]] = {}
    held_out = []
    for seed in range(args.seeds):
        for algorithm in ("fedbis", "fedbiscuit"):
            result = run(algorithm, seed, args)
            for name, row in rows_of(algorithm, result).items():
                table.setdefault(name, []).append(row)
            if algorithm == "fedbiscuit":
                held_out.append(sorted(result["unseen"]["assignment"]))
    columns = ["seen", "seen worst", "unseen", "unseen worst"]
    print("\nagreement (%), mean +- sd over seeds [min, max]\n")
    print("| method | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, rows in table.items():
        print(f"| {name} | " + " | ".join(cell([r[c] for r in rows]) for c in columns) + " |")
    print(f"\nunseen clients by seed: {held_out}")
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
