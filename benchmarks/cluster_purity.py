"""Which clients FedBiscuit's groupings put together, and whether that is more than chance.

For each grouping a run logged: its adjusted Rand index (1: the clusters are the label's groups; about 0:
chance) and its purity against three labels of the clients, each with its chance probability (how often
clusters of the same sizes, filled with the same clients at random, score at least as high; a permutation test,
`fedbiscuit.report.chance_probability`), the clients decided by their scores (margin beyond 2 standard errors,
relative to the other clients where the run logged it), the median z and how many clients changed cluster.
Purity is blind to a small group: 4 harmlessness clients among 16 in two balanced clusters give 75% whatever
the grouping did; the Rand index is not. Note the power:
with two balanced clusters of 8, even all 4 harmlessness clients on one selector has chance probability 0.077.

  subset   the natural client id (HH: the subset a client's pairs came from)
  harm     harmlessness raters (harmless-base) against everybody else: the disagreement the method is for
  length   clients whose people preferred the longer answer more often than the median client, against the rest
           (answer length in characters, on the client's training pairs): a grouping can also follow length

    python benchmarks/cluster_purity.py runs/issue18/all_fedbiscuit_s0 runs/issue18/all_fedbiscuit_s1 \\
        --json runs/issue18/purity.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import write_json


def length_groups(run: Path) -> dict[str, str]:
    """Client -> "longer" / "shorter": above or at-or-below the median client's share of pairs won by the longer
    answer."""
    from fedbiscuit.config import load_config
    from fedbiscuit.data import prepare_data

    cfg = load_config(run / "config.yaml", [])
    data = prepare_data(cfg.data, seed=cfg.seed)
    share = {}
    for name, client in data.clients.items():
        won = [
            (len(q.response_a) > len(q.response_b)) == (q.label > 0.5)
            for q in client.train
            if q.label != 0.5 and len(q.response_a) != len(q.response_b)
        ]
        share[name] = sum(won) / max(1, len(won))
    median = statistics.median(share.values())
    return {c: ("longer" if s > median else "shorter") for c, s in share.items()}, share


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--draws", type=int, default=20_000)
    p.add_argument("--json")
    args = p.parse_args()

    from fedbiscuit.report import adjusted_rand, chance_probability, grouping_decided, purity, read_metrics

    out = []
    for run in map(Path, args.runs):
        groupings = [r for r in read_metrics(run) if r["event"] == "grouping"]
        if not groupings:
            print(f"{run}: no grouping logged")
            continue
        length, share = length_groups(run)
        labels = {
            "subset": lambda c: c.split("#", 1)[0],
            "harm": lambda c: "harm" if c.startswith("harmless") else "help",
            "length": length.get,
        }
        print(f"{run}")
        print(
            "  round | "
            + " | ".join(f"{k}: ARI (p), purity (p)" for k in labels)
            + " | decided | median z | changed"
        )
        rows = []
        for g in groupings:
            a = g["assignment"]
            row = {"round": g["round"], "clusters": a}
            for k, f in labels.items():
                row[k] = {
                    "ari": adjusted_rand(a, f),
                    "ari_p": chance_probability(a, f, adjusted_rand, draws=args.draws),
                    "purity": purity(a, f),
                    "purity_p": chance_probability(a, f, purity, draws=args.draws),
                }
            row["decided"], row["median_z"] = grouping_decided(g)
            row["changed"] = None if g.get("changed") is None else len(g["changed"])
            rows.append(row)
            cells = " | ".join(
                f"{row[k]['ari']:+.2f} ({row[k]['ari_p']:.2g}), {100 * row[k]['purity']:.0f}% ({row[k]['purity_p']:.2g})"
                for k in labels
            )
            z = "-" if row["median_z"] is None else f"{row['median_z']:.2f}"
            decided = "-" if row["decided"] is None else f"{row['decided']}/{len(a)}"  # grouped by updates
            print(f"  {g['round']:5d} | {cells} | {decided} | {z} | {row['changed']}")
        out.append({"run": str(run), "length_share": share, "groupings": rows})
    write_json(args.json, out)
    if args.json:
        print(json.dumps({"written": args.json}))


if __name__ == "__main__":
    main()
