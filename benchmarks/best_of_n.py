"""Best-of-n against an independent gold judge: do the labelling selectors carry signal before any DPO?

The policy (the base model, adapters off) samples n + 1 answers to each evaluation prompt; the labelling
selectors pick among the first n by knockout (several selectors, e.g. FedBiscuit's: by their vote), and the
gold judge compares each pick with the last sample, which no pick can be (both orders, strict and
probability-averaged win rates). One bracket gives the picks for n = 1, 2, 4, ... (`fedbiscuit.rlhf.evaluation.
best_of_n_curve`), plotted against KL_bon = log n - (n - 1) / n (Gao et al. 2022). Beside the gold curve, the
labellers' own verdict on the same picks (the proxy): proxy up and gold flat or down is over-optimization.

Before the curve the script measures the judges on human labels: the gold judge's and each labeller's agreement
on the evaluation split's pairs (the labellers' config), with its 95% interval and position bias. A gold judge
below 60% is reported and its curve flagged: it cannot tell good from bad answers reliably enough.

The gold judge must have seen none of the labellers' data. As run in BENCHMARKS.md: labellers trained on
helpful-base (centralized and FedBis), the gold judge trained centrally on helpful-online and helpful-rejection-
sampled (other raters, other prompts), prompts from helpful-base's test split:

    fedbiscuit run configs/hh_centralized.yaml 'data.subsets=[helpful-online,helpful-rejection-sampled]' \\
        train.epochs=2 name=gold_helpful_other output_dir=runs/issue16
    python benchmarks/best_of_n.py --labeller runs/issue18/hb_central --judge runs/issue16/gold_helpful_other \\
        --prompts 96 --n 16 --json runs/issue16/bon_hb_central.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import write_json

GOLD_FLOOR = 0.60  # below this the gold judge's verdicts are not used (issue 16)


def adapter_of(path: str) -> dict:
    """The selectors of a run folder (federated: newest checkpoint; centralized: its selector) or one file."""
    from fedbiscuit.models.adapters import read_adapter
    from fedbiscuit.rlhf.phase2 import load_selectors

    p = Path(path)
    return {p.stem: read_adapter(p)[0]} if p.is_file() else load_selectors(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--labeller", action="append", required=True, help="run folder or adapter file (repeatable)"
    )
    ap.add_argument(
        "--judge", required=True, help="the gold judge: a centralized run folder or an adapter file"
    )
    ap.add_argument(
        "--config", help="model, data and selector settings (default: the first labeller's config)"
    )
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--n", type=int, default=16, help="largest n, a power of 2")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", help="write the curve as a PNG here")
    ap.add_argument("--json")
    args = ap.parse_args()

    from fedbiscuit.config import load_config
    from fedbiscuit.models.adapters import load_adapter_state
    from fedbiscuit.models.loading import cache_root
    from fedbiscuit.pipeline import SELECTOR, evaluate, open_workspace
    from fedbiscuit.rlhf.evaluation import best_of_n_curve
    from fedbiscuit.rlhf.generation import sample
    from fedbiscuit.rlhf.judges import SelectorJudge, VoteJudge
    from fedbiscuit.rlhf.phase2 import choose_prompts

    config = args.config or str(Path(args.labeller[0]) / "config.yaml")
    cfg = load_config(config, [f"rlhf.eval_prompts={args.prompts}", "rlhf.num_prompts=1"])
    ws = open_workspace(cfg, quiet=False)
    labellers = {}
    for path in args.labeller:
        for name, state in adapter_of(path).items():
            labellers[f"{Path(path).name}/{name}"] = state
    (gold_name, gold), *more = adapter_of(args.judge).items()
    if more:
        raise SystemExit(f"--judge {args.judge}: one selector expected, found {1 + len(more)}")

    def on_human_labels(state) -> dict:
        load_adapter_state(ws.model, SELECTOR, state, where="best_of_n")
        o = evaluate(ws, "judge")["overall"]
        return {
            k: o.get(k) for k in ("agreement", "ci95", "agreement_ab", "agreement_ba", "position_bias", "n")
        }

    judges = {"gold": on_human_labels(gold), **{n: on_human_labels(s) for n, s in labellers.items()}}
    for name, r in judges.items():
        print(
            f"{name}: agreement {100 * r['agreement']:.1f}% [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}] "
            f"on {r['n']} test pairs (A|B {100 * r['agreement_ab']:.1f}%, B|A {100 * r['agreement_ba']:.1f}%, "
            f"position bias {r['position_bias']:+.3f})"
        )
    trusted = judges["gold"]["agreement"] >= GOLD_FLOOR
    if not trusted:
        print(f"the gold judge is below {100 * GOLD_FLOOR:.0f}%: its verdicts below are not evidence")

    _, prompts, _ = choose_prompts(ws)
    gen = cfg.rlhf.generation.model_copy(update={"max_new_tokens": args.max_new_tokens})
    # cached by prompts, settings, seed and weights: every labeller of the same base model meets the same samples
    out = sample(
        ws.model,
        ws.tokenizer,
        prompts,
        gen,
        n=args.n + 1,
        adapter=None,
        seed=args.seed,
        cache_dir=cache_root(cfg.model) / "candidates",
        quiet=False,
    )
    candidates = [t[: args.n] for t in out.texts]
    baseline = [t[args.n] for t in out.texts]
    picker = VoteJudge(ws.model, ws.encoder, ws.choice_ids, labellers, SELECTOR, True, cfg.eval.batch_size)
    judge = SelectorJudge(ws.model, ws.encoder, ws.choice_ids, gold, SELECTOR, f"gold {gold_name}")
    curve = best_of_n_curve(
        picker,
        judge,
        prompts,
        candidates,
        baseline,
        lengths=[x[: args.n] for x in out.new_tokens],
        baseline_lengths=[x[args.n] for x in out.new_tokens],
    )

    def cell(w: dict) -> str:
        return f"{100 * w['win_rate']:.1f}% [{100 * w['ci95'][0]:.1f}, {100 * w['ci95'][1]:.1f}]"

    print(f"\n{len(prompts)} prompts; the pick against an independent sample of the same prompt")
    print(
        "n | KL_bon | gold (both orders agree) | gold (probabilities averaged) | gold, length-controlled "
        "| proxy (labellers) | pick tokens"
    )
    for r in curve:
        print(
            f"{r['n']} | {r['kl_bon']:.2f} | {cell(r['gold'])} | {100 * r['gold']['mean_prob']:.1f}% | "
            f"{cell(r['gold']['length_controlled'])} | {cell(r['proxy'])} | {r['mean_new_tokens']:.1f}"
        )
    # each n against n = 1 on the same prompts and baseline samples: paired, so the judge's own bias cancels
    import torch

    from fedbiscuit.selector.metrics import paired_comparison

    first = torch.tensor(curve[0]["gold"]["scores"])
    print("\ngold verdicts, each n against n = 1 on the same prompts (paired bootstrap, sign test):")
    for r in curve[1:]:
        c = paired_comparison(first, torch.tensor(r["gold"]["scores"]))
        r["gold_against_n1"] = c
        lo, hi = c["ci95"]
        print(
            f"  n = {r['n']}: {100 * c['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}], "
            f"{c['gained']} prompts up, {c['lost']} down, p = {c['mcnemar_p']:.2g}"
        )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        x = [r["kl_bon"] for r in curve]
        for key, label in (("gold", "gold judge"), ("proxy", "labelling selectors")):
            y = [100 * r[key]["win_rate"] for r in curve]
            lo = [100 * r[key]["ci95"][0] for r in curve]
            hi = [100 * r[key]["ci95"][1] for r in curve]
            ax.plot(x, y, marker="o", label=label)
            ax.fill_between(x, lo, hi, alpha=0.2)
        ax.axhline(50, color="grey", lw=0.8, ls="--")
        for r in curve:
            ax.annotate(f"n={r['n']}", (r["kl_bon"], 100 * r["gold"]["win_rate"]), fontsize=7)
        ax.set(xlabel="KL_bon = log n - (n-1)/n (nats)", ylabel="win rate against a random sample (%)")
        ax.set_title(f"best-of-n, {len(prompts)} prompts" + ("" if trusted else " (gold judge below 60%)"))
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    write_json(
        args.json,
        {
            "labellers": list(labellers),
            "judge": args.judge,
            "on_human_labels": judges,
            "gold_trusted": trusted,
            "prompts": len(prompts),
            "curve": [{k: v for k, v in r.items()} for r in curve],
            "mean_new_tokens": out.mean_length(),
        },
    )
    if args.json:
        print(json.dumps({"written": args.json}))


if __name__ == "__main__":
    main()
