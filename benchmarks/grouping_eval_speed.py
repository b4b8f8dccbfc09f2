"""A FedBiscuit grouping round and an evaluation of 1,000 test pairs, timed as they run, cached path against
today's full path, side by side in one run (`selector_speed.py` derives these two from a scoring rate; this
script times the real thing).

Grouping round: every one of the 16 HH clients (`configs/hh_fedbiscuit.yaml`: 4 subsets x 4 clients) scores
K=2 selectors on 24 pairs of its held-out slice, through ``SelectorClient.score``, the code the local engine
and the Flower ClientApp run. Evaluation: the first 1,000 HH test pairs through ``pipeline.evaluate`` (both
orders, batches of 32 pairs), the code every run's evaluation uses.

Variants (each in its own subprocess):
  today        the full path as configured before the cached path existed: LoRA r=8 on q/v in all 30
               blocks, fp32
  cached-bf16  hh_fedbiscuit.yaml as it is: LoRA r=16 on q/k/v/o of the top 4 blocks over the cached trunk,
               bf16 where the CPU has it. The trunk states are read from the store; any that are missing are
               built first and that time is reported apart (build it once with benchmarks/trunk_cache.py)

    python benchmarks/grouping_eval_speed.py --json runs/bench/grouping_eval_speed.json
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from common import ROOT, run_variant, write_json

VARIANTS = ("today", "cached-bf16")
TODAY = [
    "selector.path=full",
    "model.dtype=float32",
    "model.lora.r=8",
    "model.lora.alpha=16",
    "model.lora.top_layers=null",
    "model.lora.target_modules=[q_proj,v_proj]",
]


def measure(variant: str, args) -> dict:
    import torch

    from fedbiscuit.config import load_config
    from fedbiscuit.federated.client import SelectorClient
    from fedbiscuit.models.loading import cpu_flags
    from fedbiscuit.pipeline import evaluate, initial_selectors, open_workspace

    overrides = (TODAY if variant == "today" else []) + [f"eval.batch_size={args.batch}"] + args.overrides
    cfg = load_config(args.config, overrides)
    ws = open_workspace(cfg, quiet=True)
    fb = cfg.federated.fedbiscuit
    start = time.perf_counter()  # tokenising, and on the cached path reading (or building) trunk states
    clients = [
        SelectorClient(i, c, ws.encoder, ws.choice_ids) for i, c in enumerate(ws.data.clients.values())
    ]
    scoring = [c.scoring_pairs(fb.grouping_pairs) for c in clients]
    tests = ws.test_pairs()[: args.eval_pairs]
    prepare_s = time.perf_counter() - start
    selectors = initial_selectors(ws.model, [f"selector-{k}" for k in range(fb.num_selectors)], cfg)

    clients[0].score(ws.model, selectors, 4, args.batch)  # warm-up: kernels, allocator
    start = time.perf_counter()
    for client in clients:
        client.score(ws.model, selectors, fb.grouping_pairs, args.batch)
    grouping_s = time.perf_counter() - start
    report = evaluate(ws, "speed", pairs=tests)
    enc = ws.encoder
    return {
        "variant": variant,
        "path": cfg.selector.path,
        "dtype": str(next(ws.model.parameters()).dtype),
        "clients": len(clients),
        "selectors": len(selectors),
        "grouping_pair_scorings": len(selectors) * sum(len(s) for s in scoring),
        "grouping_round_s": grouping_s,
        "eval_pairs": len(tests),
        "eval_s": report["seconds"],
        "eval_agreement": report["overall"]["agreement"],
        "prepare_s": prepare_s,
        "trunk_built": getattr(enc, "stats", {}).get("built"),
        "trunk_found": getattr(enc, "stats", {}).get("found"),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "cpu_flags": sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "hh_fedbiscuit.yaml"))
    p.add_argument("--eval-pairs", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32, help="pairs per scoring batch (eval.batch_size)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", help="write the rows here too")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides for every variant (key=value)")
    args = p.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args)))
        return
    argv = ["--config", args.config, "--eval-pairs", str(args.eval_pairs), "--batch", str(args.batch)]
    rows = [run_variant(__file__, v, argv + args.overrides) for v in args.variants.split(",")]
    r0 = rows[0]
    print(f"{args.config}; threads={r0['threads']}; CPU flags: {' '.join(r0['cpu_flags'])}")
    print(
        "| variant | dtype | grouping round: clients x K, pair scorings | grouping round (s) | x | "
        "eval of N test pairs (s) | x | trunk states built / found | peak RSS (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        trunk = "-" if r["trunk_found"] is None else f"{r['trunk_built']} / {r['trunk_found']}"
        print(
            f"| {r['variant']} | {r['dtype'].removeprefix('torch.')} | {r['clients']} x {r['selectors']}, "
            f"{r['grouping_pair_scorings']} | {r['grouping_round_s']:.1f} | "
            f"{r0['grouping_round_s'] / r['grouping_round_s']:.1f} | N={r['eval_pairs']}: {r['eval_s']:.1f} | "
            f"{r0['eval_s'] / r['eval_s']:.1f} | {trunk} | {r['peak_rss_mb']:.0f} |"
        )
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
