"""A cached training step with LoRA in the top 4 blocks (r=16, the HH configs) against the top 2 (r=32: the same
number of adapter parameters), alternating in one process on the same HH train pairs.

The machine's speed drifts by 20-30% over minutes here, so the two layouts alternate batch by batch (the order
flipping every pass) and medians are compared. A training step is forward + backward + AdamW (8 pairs = 16
rows, grouped by length as training does); a scoring step is a no-grad forward of 32 pairs in both orders.
Each side has its own trunk store (the states below block L-4 and L-2), built first and not timed. Whether
the top 2 learn as well is a separate, paired agreement test (BENCHMARKS.md, "Speed").

    python benchmarks/top_layers_ab.py --pairs 400 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from common import ROOT, hh_cached_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=400)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--data", default=os.environ.get("FEDBISCUIT_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    )
    args = p.parse_args()

    from fedbiscuit.config import config_from_dict
    from fedbiscuit.models.loading import cpu_flags
    from fedbiscuit.pipeline import open_workspace
    from fedbiscuit.selector.training import choice_loss

    sides = {}
    for name, top, rank in (("top 4, r=16", 4, 16), ("top 2, r=32", 2, 32)):
        raw = hh_cached_config(args.data, top_layers=top)
        raw["model"]["lora"].update(r=rank, alpha=2 * rank)
        ws = open_workspace(config_from_dict(raw), quiet=True)
        per = args.pairs // len(ws.data.clients)
        pairs = ws.encoder.encode([q for c in ws.data.clients.values() for q in c.train[:per]])
        params = [w for w in ws.model.parameters() if w.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
        n_params = sum(w.numel() for w in params)
        sides[name] = (ws, sorted(pairs, key=ws.encoder.length), opt, n_params)
        ws.model.train()

    def step(name, batch, train):
        ws, _, opt, _ = sides[name]
        start = time.perf_counter()
        with torch.set_grad_enabled(train):
            logits = ws.encoder.logits(ws.model, batch, True, ws.choice_ids)[0]
            if train:
                target = torch.tensor([q.label for q in batch] + [1 - q.label for q in batch])
                choice_loss(logits, target).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    names = list(sides)
    n = len(sides[names[0]][1])
    times = {(k, s): [] for k in ("train", "score") for s in names}
    for rep in range(args.repeats + 1):  # the first pass warms up and is not counted
        order = names if rep % 2 else names[::-1]
        for i in range(0, n - 7, 8):
            for name in order:
                t = step(name, sides[name][1][i : i + 8], train=True)
                if rep:
                    times["train", name].append(t)
        for i in range(0, n - 31, 32):
            for name in order:
                t = step(name, sides[name][1][i : i + 32], train=False)
                if rep:
                    times["score", name].append(t)
    ws = sides[names[0]][0]
    flags = " ".join(sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"}))
    print(
        f"{n} HH train pairs, threads={torch.get_num_threads()}, dtype={next(ws.model.parameters()).dtype}, "
        f"CPU flags: {flags}; adapter parameters: " + ", ".join(f"{s} {sides[s][3]:,}" for s in names)
    )
    print(f"| step (median s) | {names[0]} | {names[1]} | speed-up |")
    print("|---|---|---|---|")
    for kind, label in (
        ("train", "training step, 8 pairs (fwd + bwd + AdamW)"),
        ("score", "scoring, 32 pairs (fwd)"),
    ):
        a, b = (statistics.median(times[kind, s]) for s in names)
        print(f"| {label} | {a:.3f} | {b:.3f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
