"""Do the clients' update directions separate the HH raters? A diagnostic for ``grouping: updates``.

From one shared selector (a finished federated run's first selector, or the untrained adapter), each of the 16
clients of configs/hh_fedbis.yaml computes two directions on its own training pairs:
  gradient  the mean gradient of the choice loss over its first N pairs (what an SGD step would move)
  probe     the change after one round's local steps with a fresh AdamW (what grouping: updates uses today)
and the directions are clustered (balanced spherical k-means, K = 2 and 4), raw and centred (each minus the
clients' mean: the shared part every client learns says nothing about groups). Printed per variant: the
adjusted Rand index of the clusters against the 4 subsets and against harmless vs helpful (with the chance
probability of random clusters of the same sizes), and the mean cosine within a subset and between subsets.

    python benchmarks/update_directions.py --run runs/issue18/all_fedbis_s0 --pairs 64
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from common import ROOT, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--run", default="untrained", help="a federated run folder (its last checkpoint) or untrained"
    )
    p.add_argument("--config", default=str(ROOT / "configs" / "hh_fedbis.yaml"))
    p.add_argument("--pairs", type=int, default=64, help="training pairs per client for the gradient")
    p.add_argument("--directions", default="gradient,probe", help="which to compute (comma-separated)")
    p.add_argument("--json")
    args = p.parse_args()
    wanted = args.directions.split(",")
    os.environ.setdefault("FEDBISCUIT_DATA_DIR", str(ROOT.parent / "shared" / "data"))

    from fedbiscuit.config import load_config
    from fedbiscuit.federated.checkpoint import list_checkpoints, load_checkpoint
    from fedbiscuit.federated.client import WORK_ADAPTER, SelectorClient, round_window
    from fedbiscuit.federated.grouping import balanced_kmeans
    from fedbiscuit.models.adapters import adapter_state
    from fedbiscuit.pipeline import open_workspace
    from fedbiscuit.report import adjusted_rand, chance_probability

    cfg = load_config(args.config, [])
    ws = open_workspace(cfg, quiet=True)
    model = ws.model
    if args.run == "untrained":
        reference = adapter_state(model, WORK_ADAPTER)
    else:
        state = load_checkpoint(list_checkpoints(Path(args.run) / "checkpoints")[-1])
        reference = next(iter(state.selectors.values()))
    clients = [
        SelectorClient(i, c, ws.encoder, ws.choice_ids) for i, c in enumerate(ws.data.clients.values())
    ]
    fed = cfg.federated
    directions: dict[str, dict[str, np.ndarray]] = {k: {} for k in ("gradient", "probe") if k in wanted}
    keys = sorted(reference)

    def change(reply) -> np.ndarray:  # the same flattening the round loop's grouping uses
        return torch.cat([(reply.state[k].double() - reference[k].double()).flatten() for k in keys]).numpy()

    for client in clients:
        if "gradient" in directions:  # minus the mean gradient: what grouping: gradients reads
            directions["gradient"][client.name] = change(
                client.gradient_step(model, reference, args.pairs, 8)
            )
        if "probe" in directions:  # one round of AdamW: what grouping: updates reads
            reply = client.train(
                model, reference, cfg.train, fed.local_steps, seed=client.index,
                schedule_window=round_window(fed.rounds, fed.local_steps, 20),
            )  # fmt: skip
            directions["probe"][client.name] = change(reply)

    def harm(c: str) -> str:
        return "harmless" if c.startswith("harmless") else "helpful"

    names = [c.name for c in clients]
    subset = [c.split("#")[0] for c in names]
    rows = []
    print(f"reference: {args.run}; {len(names)} clients; gradient over {args.pairs} pairs each")
    print(
        "| direction | centred | K | ARI vs subsets (p) | ARI vs harmless/helpful (p) | cos within subset | between |"
    )
    print("|---|---|---|---|---|---|---|")
    for kind, by_client in directions.items():
        x = np.stack([by_client[c] for c in names])
        for centred in (False, True):
            y = x - x.mean(0) if centred else x
            unit = y / np.linalg.norm(y, axis=1, keepdims=True)
            cos = unit @ unit.T
            same = [cos[i, j] for i in range(len(names)) for j in range(i) if subset[i] == subset[j]]
            other = [cos[i, j] for i in range(len(names)) for j in range(i) if subset[i] != subset[j]]
            for k in (2, 4):
                idx, _ = balanced_kmeans(y, k, seed=0)
                found = {c: f"cluster-{i}" for c, i in zip(names, idx, strict=True)}
                row = {
                    "direction": kind,
                    "centred": centred,
                    "k": k,
                    "ari_subset": adjusted_rand(found),
                    "ari_subset_p": chance_probability(found, statistic=adjusted_rand, draws=5000),
                    "ari_harm": adjusted_rand(found, harm),
                    "ari_harm_p": chance_probability(found, harm, statistic=adjusted_rand, draws=5000),
                    "cos_within": float(np.mean(same)),
                    "cos_between": float(np.mean(other)),
                    "clusters": found,
                }
                rows.append(row)
                print(
                    f"| {kind} | {centred} | {k} | {row['ari_subset']:+.2f} ({row['ari_subset_p']:.2g}) | "
                    f"{row['ari_harm']:+.2f} ({row['ari_harm_p']:.2g}) | {row['cos_within']:.3f} | "
                    f"{row['cos_between']:.3f} |"
                )
    write_json(args.json, {"run": args.run, "pairs": args.pairs, "rows": rows})


if __name__ == "__main__":
    main()
