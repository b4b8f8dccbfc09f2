"""Selector speed: the cached path against the full path, side by side in one run, on the same HH-RLHF pairs.

Variants (each in its own subprocess, so its peak RSS is its own; all on SmolLM2, max_length 256):
  today        the full path as configured before the cached path existed: LoRA r=8 on q/v in all 30 blocks,
               fp32, every step runs (and back-propagates through) the whole decoder
  full-fp32    the full path with the cached path's adapter (LoRA r=16 on q, k, v, o of the top 4
               blocks), fp32
  cached-fp32  the cached path, fp32: the 26 frozen blocks run once per pair (timed as the cache build),
               then only the top 4 blocks
  full-bf16    as full-fp32, in bf16
  cached-bf16  as cached-fp32, in bf16

Measured per variant: training sequences per second (optimizer steps of 8 pairs = 16 sequences, pairs grouped
by length), scoring pairs per second (both orders, batches of 32 pairs), and for the cached path the cache
build (pairs per second, bytes per pair, into an empty store). From the scoring rate: the time of a FedBiscuit
grouping round (16 clients x 24 held-out pairs x K=2 selectors) and of an evaluation of 1,000 test pairs;
the cached figures assume the states exist (built once per pair; the build is in its own column).

    python benchmarks/selector_speed.py                       # SmolLM2, the figures in BENCHMARKS.md
    python benchmarks/selector_speed.py --model tiny --steps 2 --score-pairs 16   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

from common import ROOT, run_variant, write_json

VARIANTS = ("today", "full-fp32", "cached-fp32", "full-bf16", "cached-bf16")
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(variant: str, args) -> dict:
    import torch

    from fedbiscuit.config import config_from_dict
    from fedbiscuit.models.loading import cpu_flags
    from fedbiscuit.pipeline import open_workspace
    from fedbiscuit.selector.training import score_pairs, train_selector

    path = "cached" if variant.startswith("cached") else "full"
    dtype = "bfloat16" if variant.endswith("bf16") else "float32"
    lora = {"r": 16, "alpha": 32, "dropout": 0.0, "top_layers": args.top_layers, "target_modules": QKVO}
    if variant == "today":
        lora = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    cache = tempfile.mkdtemp(prefix="trunk-")  # an empty store: the build is timed from scratch
    cfg = config_from_dict(
        {
            "data": {"source": "hh_rlhf", "root": args.data, "heldout_fraction": 0.0},
            "model": {"name_or_path": args.model, "device": "cpu", "dtype": dtype, "lora": lora},
            "selector": {"max_length": args.max_length, "path": path, "cache_dir": cache},
            "train": {"lr": 1e-4, "batch_size": args.batch, "steps": args.steps},
        }
    )
    ws = open_workspace(cfg, quiet=True)
    model, enc, choice = ws.model, ws.encoder, ws.choice_ids
    # the same pairs for every variant: the first of each subset's train and test files
    train_raw = [p for c in ws.data.clients.values() for p in c.train[: args.train_pairs // 4]]
    test_raw = [p for pairs in ws.data.all_test().values() for p in pairs[: args.score_pairs // 4]]
    loaded_mb = _rss_mb()

    start = time.perf_counter()
    train, test = enc.encode(train_raw), enc.encode(test_raw)
    build_s = time.perf_counter() - start
    out = {"variant": variant, "dtype": dtype, "path": path}
    if path == "cached":
        out |= {
            "cache_pairs_per_s": (len(train) + len(test)) / build_s,
            "cache_bytes_per_pair": enc.store.nbytes / len(enc.store),
        }
    train_selector(model, enc, train, cfg.train.model_copy(update={"steps": 1}), choice, seed=1)  # warm-up
    start = time.perf_counter()
    result = train_selector(model, enc, train, cfg.train, choice, seed=0)
    train_s = time.perf_counter() - start
    score_pairs(model, enc, test[: args.score_batch], choice, args.score_batch)  # warm-up
    start = time.perf_counter()
    score_pairs(model, enc, test, choice, args.score_batch)
    score_s = time.perf_counter() - start
    pairs_per_s = len(test) / score_s
    out |= {
        "train_seq_per_s": 2 * result.samples / train_s,
        "score_pairs_per_s": pairs_per_s,
        "grouping_round_s": 16 * 24 * 2 / pairs_per_s,
        "eval_1000_s": 1000 / pairs_per_s,
        "peak_rss_mb": _rss_mb(),
        "after_load_rss_mb": loaded_mb,
        "threads": torch.get_num_threads(),
        "cpu_flags": sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}),
        "train_pairs": len(train),
        "score_pairs": len(test),
    }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded")
    p.add_argument(
        "--data", default=os.environ.get("FEDBISCUIT_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    )
    p.add_argument("--batch", type=int, default=8, help="pairs per training step (x2 sequences)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--top-layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--train-pairs", type=int, default=64)
    p.add_argument("--score-pairs", type=int, default=64)
    p.add_argument("--score-batch", type=int, default=32)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", help="write the rows here too")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args)))
        return
    argv, skip = [], False
    for a in sys.argv[1:]:  # everything but --json (only the parent writes it)
        if skip or a.startswith("--json"):
            skip = a == "--json" and not skip
            continue
        argv.append(a)
    rows = [run_variant(__file__, v, argv) for v in args.variants.split(",")]
    r0 = rows[0]
    print(
        f"model={args.model} max_length={args.max_length} top_layers={args.top_layers} "
        f"train: {args.steps} steps x {args.batch} pairs; scoring {r0['score_pairs']} test pairs; "
        f"threads={r0['threads']}; CPU flags: {' '.join(r0['cpu_flags'])}"
    )
    print(
        "| variant | train seq/s | x today | score pairs/s | grouping round (s) | 1,000-pair eval (s) | x today "
        "| cache build pairs/s | cache bytes/pair | peak RSS (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cache = (
            f"{r['cache_pairs_per_s']:.2f} | {r['cache_bytes_per_pair'] / 1e3:.0f} kB"
            if "cache_pairs_per_s" in r
            else "- | -"
        )
        print(
            f"| {r['variant']} | {r['train_seq_per_s']:.2f} | {r['train_seq_per_s'] / r0['train_seq_per_s']:.1f} | "
            f"{r['score_pairs_per_s']:.2f} | {r['grouping_round_s']:.0f} | {r['eval_1000_s']:.0f} | "
            f"{r['score_pairs_per_s'] / r0['score_pairs_per_s']:.1f} | {cache} | {r['peak_rss_mb']:.0f} |"
        )
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
