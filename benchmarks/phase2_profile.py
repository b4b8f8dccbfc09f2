"""Where phase 2's time goes on a large-vocabulary model, outside the model's own arithmetic (issue 17).

A Gemma-2B-shaped random model (`gpu_check.build`: width 2,048, MLP 16,384, one KV head, a 256,000-row
vocabulary; fewer blocks with --layers, since the costs this looks for grow with width and vocabulary, not
depth) runs phase 2's pieces under cProfile: sampling candidates, encoding the preference pairs, the DPO
reference pass and DPO steps. Printed per piece: wall seconds, and the functions with the most time of their
own, split into the model's arithmetic (torch operators) and Python of ours or transformers' (loops over rows,
padding, fingerprints, host syncs): a cost the profile shows in the second group is one to fix.

    python benchmarks/phase2_profile.py --layers 2 --json runs/bench/phase2_profile.json
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from common import write_json
from gpu_check import build

OURS = ("fedbiscuit",)


def profiled(label: str, fn, top: int) -> tuple[object, dict]:
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    out = fn()
    prof.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(prof)
    rows = []
    for (path, line, func), (_, calls, own, _cum, _) in stats.stats.items():
        rows.append(
            {"where": f"{path.split('site-packages/')[-1]}:{line}({func})", "calls": calls, "own_s": own}
        )
    rows.sort(key=lambda r: -r["own_s"])
    ours = sum(r["own_s"] for r in rows if any(k in r["where"] for k in OURS))
    print(
        f"\n{label}: {wall:.2f} s wall; own time in fedbiscuit's Python: {ours:.3f} s ({100 * ours / wall:.1f}%)"
    )
    for r in rows[:top]:
        print(f"  {r['own_s']:7.3f} s  {r['calls']:7d} calls  {r['where'][-110:]}")
    return out, {"part": label, "wall_s": wall, "fedbiscuit_python_s": ours, "top": rows[:top]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--json")
    args = p.parse_args()

    from fedbiscuit.config import DPOConfig, GenerationConfig, LoraSettings
    from fedbiscuit.models.adapters import add_adapter
    from fedbiscuit.rlhf.baselines import HumanPair
    from fedbiscuit.rlhf.dpo import encode_preferences, reference_logps, train_dpo
    from fedbiscuit.rlhf.generation import sample

    torch.manual_seed(0)
    model, tok = build("gemma2b-shaped", args.device, getattr(torch, args.dtype), layers=args.layers)
    model = add_adapter(
        model, "policy", LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    params = sum(p.numel() for p in model.parameters())
    print(
        f"gemma2b-shaped, {args.layers} blocks: {params / 1e6:.0f}M parameters, {args.dtype} on {args.device}"
    )
    gen = GenerationConfig(max_new_tokens=args.new_tokens, batch_size=8, chat_template=False)
    prompts = [
        f"Question {i}: how would you explain topic number {i} to a child? " * 3 for i in range(args.prompts)
    ]
    sample(model, tok, prompts[:2], gen, n=2, adapter="policy", seed=9)  # warm-up
    parts = []
    cands, row = profiled(
        "sample", lambda: sample(model, tok, prompts, gen, n=2, adapter="policy", seed=0), args.top
    )
    parts.append(row)
    pairs = [HumanPair(p, t[0] or "a", t[1] or "b") for p, t in zip(prompts, cands.texts, strict=True)]
    prefs, row = profiled("encode_preferences", lambda: encode_preferences(tok, pairs, gen), args.top)
    parts.append(row)
    pad = tok.pad_token_id
    ref, row = profiled("reference_logps", lambda: reference_logps(model, prefs, pad), args.top)
    parts.append(row)
    dpo = DPOConfig(batch_size=4, lr=1e-5)
    _, row = profiled(
        f"train_dpo ({args.steps} steps of 4 pairs)",
        lambda: train_dpo(model, "policy", prefs, ref, dpo, pad, steps=args.steps),
        args.top,
    )
    parts.append(row)
    write_json(args.json, {"layers": args.layers, "parameters": params, "dtype": args.dtype, "parts": parts})


if __name__ == "__main__":
    main()
