"""One cached-path step, today's top-block layout against the plain one, interleaved in one process.

  plain   both orders as whole rows through the top blocks (the layout before session 7): 2 x (prefix + suffix)
          positions per pair, every block's MLP at every position
  today   the (a, b) row whole, then the (b, a) suffix on the prefix's cached keys and values, and the last
          block's MLP at the answer position only (``CachedEncoder.logits``)

The machine's speed drifts by 20-30% over minutes here, so the two alternate batch by batch on the same
batches (real HH train pairs, 8 pairs = 16 rows per step, grouped by length as training does) and the medians
are compared. A training step is forward + backward (optimizer excluded: identical); a scoring step is a
no-grad forward of 32 pairs. The answer logits of the two agree to bf16 precision (printed).

    python benchmarks/cached_step_ab.py --pairs 400 --repeats 3
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
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top-layers", type=int, default=4)
    p.add_argument(
        "--data", default=os.environ.get("FEDBISCUIT_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    )
    args = p.parse_args()

    from fedbiscuit.config import config_from_dict
    from fedbiscuit.models.loading import cpu_flags
    from fedbiscuit.pipeline import open_workspace
    from fedbiscuit.selector import trunk
    from fedbiscuit.selector.scoring import answer_logits
    from fedbiscuit.selector.training import choice_loss

    cfg = config_from_dict(hh_cached_config(args.data, top_layers=args.top_layers))
    ws = open_workspace(cfg, quiet=True)
    enc, model, choice = ws.encoder, ws.model, ws.choice_ids
    per = args.pairs // len(ws.data.clients)
    pairs = enc.encode([q for c in ws.data.clients.values() for q in c.train[:per]])
    with torch.no_grad():  # LoRA B starts at zero; give the adapter values so its gradients are real work
        for name, w in model.named_parameters():
            if "lora_B" in name:
                w.normal_(0, 1e-3)

    def plain(batch, both_orders=True):
        states = [enc.store.get(trunk.pair_key(q)) for q in batch]
        rows = [torch.cat([pre, ab]) for pre, ab, _ in states]
        rows += [torch.cat([pre, ba]) for pre, _, ba in states] if both_orders else []
        hidden, mask = trunk._stack(rows, None)
        with trunk.decoder_slice(model, enc.start, enc.num_layers, final_norm=True) as dec:
            h = dec(inputs_embeds=hidden, attention_mask=mask, use_cache=False).last_hidden_state
        return answer_logits(model, h, mask, choice)

    def today(batch, both_orders=True):
        return enc.logits(model, batch, both_orders, choice)[0]

    order = sorted(pairs, key=enc.length)
    train_batches = [order[i : i + 8] for i in range(0, len(order) - 7, 8)]
    score_batches = [order[i : i + 32] for i in range(0, len(order) - 31, 32)]
    times = {(k, f): [] for k in ("train", "score") for f in ("plain", "today")}
    worst = 0.0
    model.train()
    for rep in range(args.repeats + 1):  # the first pass warms up and is not counted
        for batch in train_batches:
            out = {}
            for name, fn in (
                (("plain", plain), ("today", today)) if rep % 2 else (("today", today), ("plain", plain))
            ):
                start = time.perf_counter()
                logits = fn(batch)
                target = torch.tensor([q.label for q in batch] + [1 - q.label for q in batch])
                choice_loss(logits, target).backward()
                if rep:
                    times["train", name].append(time.perf_counter() - start)
                out[name] = logits.detach()
                model.zero_grad(set_to_none=True)
            worst = max(worst, float((out["plain"] - out["today"]).abs().max()))
        with torch.no_grad():
            for batch in score_batches:
                for name, fn in (("plain", plain), ("today", today)):
                    start = time.perf_counter()
                    fn(batch)
                    if rep:
                        times["score", name].append(time.perf_counter() - start)
    flags = " ".join(sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"}))
    print(
        f"{len(pairs)} HH train pairs, top {args.top_layers} blocks, threads={torch.get_num_threads()}, "
        f"dtype={next(model.parameters()).dtype}, CPU flags: {flags}; largest logit difference {worst:.3g}"
    )
    print("| step | plain (median s) | today (median s) | speed-up |")
    print("|---|---|---|---|")
    for kind, label in (
        ("train", "training step, 8 pairs (fwd + bwd)"),
        ("score", "scoring, 32 pairs (fwd)"),
    ):
        a, b = statistics.median(times[kind, "plain"]), statistics.median(times[kind, "today"])
        print(f"| {label} | {a:.3f} | {b:.3f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
