"""Phase-2 runs judged on the same evaluation prompts: each tuned policy's win rate against the initial policy,
and the paired difference between two arms, per prompt.

Each run's last "tuned policy" win rate (its metrics.jsonl) holds one verdict per evaluation prompt (1 win,
0 loss, 0.5 tie, judged in both orders) with the prompt's id. Per run: the win rate, the sign test of wins
against losses, the paired bootstrap interval of (win rate - 50%), the length-controlled win rate, and, where the
run judged the initial policy's own second sample against the same reference answers (its "initial policy" win
rate: the noise), the tuned policy's verdicts minus those, paired per prompt. Per
comparison (``--compare A B``): B's verdicts minus A's on the prompts both judged, with a paired bootstrap
interval and the sign test of the per-prompt differences. Runs named ``<arm>_s<seed>`` pool over seeds per
prompt, as benchmarks/paired_runs.py does (an interval conditional on the seeds run).

    python benchmarks/paired_winrates.py runs/issue16/dpo_central_s0 runs/issue16/dpo_fedbis_s0 \\
        --compare runs/issue16/dpo_feddpo_s0 runs/issue16/dpo_central_s0 --json out.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from common import write_json


def winrates(run: str, label: str) -> list[dict]:
    """The run's win-rate records with this label ("tuned policy", "initial policy"), in the order logged."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        sys.exit(f"{run}: no metrics.jsonl (not a finished phase-2 run)")
    records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in records if r.get("event") == "winrate" and r.get("label") == label]


def tuned_verdicts(run: str) -> dict:
    """The run's last "tuned policy" win-rate record (scores and prompt ids), or exit naming what is missing."""
    path = Path(run) / "metrics.jsonl"
    tuned = winrates(run, "tuned policy")
    if not tuned:
        sys.exit(f"{path}: no 'tuned policy' win rate (the run did not finish phase 2)")
    if "prompt_ids" not in tuned[-1]:
        sys.exit(f"{path}: its win rate has no prompt_ids (a run from before they were logged)")
    return tuned[-1]


def initial_verdicts(run: str) -> dict | None:
    """The run's "initial policy" win-rate record (the untuned model's second sample against the same reference
    answers), or None where the run has none with prompt ids."""
    initial = winrates(run, "initial policy")
    return initial[-1] if initial and "prompt_ids" in initial[-1] else None


def arm(run: str) -> str:
    return re.sub(r"_s\d+$", "", Path(run).name)


def by_prompt(record: dict) -> dict[str, float]:
    return dict(zip(record["prompt_ids"], record["scores"], strict=True))


def compare(before: dict[str, float], after: dict[str, float], names: tuple[str, str]) -> dict:
    import torch

    from fedbiscuit.selector.metrics import paired_comparison

    if before.keys() != after.keys():
        sys.exit(
            f"{names[0]} and {names[1]} were not judged on the same prompts "
            f"({len(before.keys() & after.keys())} shared of {len(before)} and {len(after)})"
        )
    keys = sorted(before)
    return paired_comparison(torch.tensor([before[k] for k in keys]), torch.tensor([after[k] for k in keys]))


def pooled(runs: list[str]) -> dict[str, float]:
    """Per prompt, the mean verdict over the runs (seeds) of one arm."""
    sums: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        for k, v in by_prompt(tuned_verdicts(run)).items():
            sums[k].append(v)
    if len({len(v) for v in sums.values()}) != 1:
        sys.exit(f"the runs of arm {arm(runs[0])} were not judged on the same prompts")
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _fmt(c: dict) -> str:
    lo, hi = c["ci95"]
    return (
        f"{100 * c['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}], sign test p={c['mcnemar_p']:.2g} "
        f"({c['gained']} up, {c['lost']} down, n={c['n']})"
    )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "runs", nargs="*", help="phase-2 run folders: each one's win rate against the initial policy"
    )
    p.add_argument("--compare", nargs=2, action="append", default=[], metavar=("A", "B"), help="B minus A")
    p.add_argument("--json")
    args = p.parse_args(argv)
    out: dict = {"runs": {}, "comparisons": [], "pools": []}
    for run in dict.fromkeys(args.runs + [r for pair in args.compare for r in pair]):
        rec = tuned_verdicts(run)
        half = {k: 0.5 for k in rec["prompt_ids"]}  # against 50%: the paired bootstrap of (win rate - 0.5)
        vs_even = compare(half, by_prompt(rec), ("50%", run))
        lc = rec.get("length_controlled", {})
        out["runs"][run] = {
            "win_rate": rec["win_rate"],
            "prompts": rec["prompts"],
            "wins": rec["wins"],
            "losses": rec["losses"],
            "ties": rec["ties"],
            "sign_p": vs_even["mcnemar_p"],
            "ci95": [0.5 + x for x in vs_even["ci95"]],
            "length_controlled": lc.get("win_rate"),
            "length_controlled_ci95": lc.get("ci95"),
            "mean_new_tokens": rec.get("mean_new_tokens"),
        }
        r = out["runs"][run]
        initial = initial_verdicts(run)
        if initial is not None:
            r["tuned_minus_initial"] = compare(by_prompt(initial), by_prompt(rec), (f"{run} (initial)", run))
        lc_text = f", length-controlled {100 * lc['win_rate']:.1f}%" if lc else ""
        print(
            f"{run}: win rate against the initial policy {100 * r['win_rate']:.1f}% "
            f"[{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}] ({r['wins']} wins, {r['ties']} ties, "
            f"{r['losses']} losses of {r['prompts']}), sign test p={r['sign_p']:.2g}{lc_text}, "
            f"{r['mean_new_tokens']} tokens"
        )
        if initial is not None:
            print(f"  tuned - initial policy, paired per prompt: {_fmt(r['tuned_minus_initial'])}")
    for a, b in args.compare:
        c = compare(by_prompt(tuned_verdicts(a)), by_prompt(tuned_verdicts(b)), (a, b))
        out["comparisons"].append({"baseline": a, "other": b, **c})
        print(f"{b} - {a}: {_fmt(c)}")
    arms: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for a, b in args.compare:
        arms[arm(a), arm(b)].append((a, b))
    for (a_arm, b_arm), pairs in arms.items():
        if len(pairs) > 1:
            c = compare(pooled([a for a, _ in pairs]), pooled([b for _, b in pairs]), (a_arm, b_arm))
            out["pools"].append({"baseline": a_arm, "other": b_arm, "seeds": len(pairs), **c})
            print(f"{b_arm} - {a_arm}, pooled over {len(pairs)} seeds (per-prompt means): {_fmt(c)}")
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
