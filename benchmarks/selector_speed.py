"""Selector speed: ours against the straightforward way, side by side in one run.

ours:  texts tokenised once per pair, both orders assembled from ids, decoder hidden state at the answer
       position times the two output rows of " A"/" B".
naive: what the reference implementation does: render each prompt string (both orders), tokenise it every
       time it is used, run the full model and take the full-vocabulary logits at every position, then pick
       the two answer logits at the last position.

Each method runs in its own subprocess so its peak RSS is its own. Prints a Markdown table.

    python benchmarks/selector_speed.py                      # SmolLM2, real HH-RLHF pairs
    python benchmarks/selector_speed.py --model tiny --steps 3  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(method: str, args) -> dict:
    import torch

    from fedbiscuit.config import config_from_dict
    from fedbiscuit.pipeline import open_workspace
    from fedbiscuit.selector.scoring import choice_logits
    from fedbiscuit.selector.training import choice_loss, make_optimizer

    torch.manual_seed(0)
    cfg = config_from_dict(
        {
            "data": {
                "source": "hh_rlhf",
                "root": args.data,
                "eval_split": None,
                "max_train_pairs_per_client": 64,
            },
            "model": {"name_or_path": args.model, "device": "cpu", "dtype": "float32"},
            "selector": {"max_length": args.max_length},
            "train": {"lr": 1e-4, "batch_size": args.batch, "steps": args.steps},
        }
    )
    ws = open_workspace(cfg, quiet=True)
    model, tok, enc, choice = ws.model, ws.tokenizer, ws.encoder, ws.choice_ids
    raw = ws.data.all_train()
    loaded_mb = _rss_mb()
    optimizer = make_optimizer(model, cfg.train)

    if method == "ours":
        pairs = enc.encode(raw)

        def batch(i, n, both):
            return enc.batch(pairs[i : i + n], both_orders=both)

        def logits(ids, mask):
            return choice_logits(model, ids, mask, choice)
    else:
        template = enc  # the same template pieces, rendered as strings
        pieces = [tok.decode(p) for p in template.pieces]
        tok.truncation_side = "left"  # cut the oldest context, keep the answer position

        def render(p, swap):
            a, b = (p.response_b, p.response_a) if swap else (p.response_a, p.response_b)
            return pieces[0] + p.prompt + pieces[1] + a + pieces[2] + b + pieces[3]

        def batch(i, n, both):
            chunk = raw[i : i + n]
            texts = [render(p, False) for p in chunk] + ([render(p, True) for p in chunk] if both else [])
            t = tok(
                texts,
                padding=True,
                truncation=True,
                max_length=args.max_length,
                return_tensors="pt",
                add_special_tokens=False,
            )
            target = torch.tensor([p.label for p in chunk] + ([1 - p.label for p in chunk] if both else []))
            return t.input_ids, t.attention_mask, target

        def logits(ids, mask):
            out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, T, vocab]
            last = mask.sum(1) - 1
            return out[torch.arange(out.shape[0]), last][:, list(choice)].float()

    # training steps: one warm-up, then timed
    model.train()
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        ids, mask, target = batch(step * args.batch, args.batch, True)
        optimizer.zero_grad()
        choice_loss(logits(ids, mask), target).backward()
        optimizer.step()
        if step:
            times.append(time.perf_counter() - start)
    model.eval()
    # scoring: both orders, batches of args.score_batch pairs
    n = min(args.score_pairs, len(raw))
    with torch.no_grad():
        ids, mask, _ = batch(0, args.score_batch, True)
        logits(ids, mask)  # warm-up
        start = time.perf_counter()
        for i in range(0, n, args.score_batch):
            ids, mask, _ = batch(i, args.score_batch, True)
            logits(ids, mask)
        score_s = time.perf_counter() - start
    return {
        "method": method,
        "train_step_s": sum(times) / len(times),
        "pairs_per_s": n / score_s,
        "peak_rss_mb": _rss_mb(),
        "after_load_rss_mb": loaded_mb,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded")
    p.add_argument(
        "--data", default=os.environ.get("FEDBISCUIT_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    )
    p.add_argument("--batch", type=int, default=4, help="pairs per training step (x2 sequences)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--score-pairs", type=int, default=48)
    p.add_argument("--score-batch", type=int, default=8)
    p.add_argument("--method", choices=["ours", "naive"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.method:
        print(json.dumps(measure(args.method, args)))
        return
    rows = []
    for method in ("ours", "naive"):
        cmd = [sys.executable, __file__, "--method", method] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"{method} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"model={args.model} batch={args.batch} pairs (x2 orders) max_length={args.max_length} "
        f"steps={args.steps} score_pairs={args.score_pairs} threads={rows[0]['threads']}"
    )
    print(
        "| method | train step (s) | pairs scored / s (both orders) | peak RSS (MB) | RSS after load (MB) |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['train_step_s']:.2f} | {r['pairs_per_s']:.2f} | {r['peak_rss_mb']:.0f} | "
            f"{r['after_load_rss_mb']:.0f} |"
        )
    ours, naive = rows
    print(
        f"speed-up: training x{naive['train_step_s'] / ours['train_step_s']:.2f}, "
        f"scoring x{ours['pairs_per_s'] / naive['pairs_per_s']:.2f}; "
        f"peak RSS {naive['peak_rss_mb'] - ours['peak_rss_mb']:.0f} MB lower"
    )


if __name__ == "__main__":
    main()
