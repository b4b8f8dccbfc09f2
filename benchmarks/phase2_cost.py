"""Phase 2 cost: generation tokens/s, and a DPO step ours against trl's DPOTrainer run plainly, same pairs.

ours: texts tokenised once, reference log-probabilities computed once up front (the reference is the base with
      the adapter disabled and never changes), the output layer applied only at response tokens.
trl:  DPOTrainer with a peft LoraConfig (its reference is the same model with the adapter disabled, computed
      at every step), default settings otherwise.

Both train a LoRA r=8 (q_proj, v_proj) policy on the same HH-RLHF pairs, batch 4 pairs, fp32 on CPU; each
runs in its own subprocess so its peak RSS is its own. Prints a Markdown table.

    python benchmarks/phase2_cost.py                 # SmolLM2
    python benchmarks/phase2_cost.py --model tiny    # a smoke run
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


def _pairs(args):
    from fedbiscuit.config import HHRLHFData
    from fedbiscuit.data.sources import load_split
    from fedbiscuit.rlhf.baselines import human_pairs

    cfg = HHRLHFData(root=args.data, subsets=["helpful-base"])
    comps, _ = load_split(cfg, "train")
    # short dialogues so both methods see the same untruncated texts
    comps = [c for c in comps if len(c.prompt) < 600 and max(len(c.response_a), len(c.response_b)) < 300]
    return human_pairs(comps)[: args.batch * (args.steps + 1)]


def _model(args):
    from fedbiscuit.config import ModelConfig
    from fedbiscuit.models.loading import load_model

    return load_model(ModelConfig(name_or_path=args.model, device="cpu", dtype="float32"))


def measure_ours(args) -> dict:
    import torch

    from fedbiscuit.config import DPOConfig, GenerationConfig, LoraSettings
    from fedbiscuit.models.adapters import add_adapter
    from fedbiscuit.rlhf.dpo import encode_preferences, reference_logps, train_dpo
    from fedbiscuit.rlhf.generation import sample

    torch.manual_seed(0)
    model, tok = _model(args)
    model = add_adapter(model, "policy", LoraSettings(r=8, alpha=16, dropout=0.05))
    pairs = _pairs(args)
    gen = GenerationConfig(max_new_tokens=args.new_tokens, batch_size=8, num_candidates=2)
    start = time.perf_counter()
    cands = sample(model, tok, [p.prompt for p in pairs[:8]], gen, adapter="policy", seed=0)
    gen_s = time.perf_counter() - start
    tokens = sum(n for row in cands.new_tokens for n in row)

    t = time.perf_counter()
    prefs = encode_preferences(tok, pairs, gen, max_response_tokens=128)
    ref = reference_logps(model, prefs, tok.pad_token_id, batch_size=args.batch)
    ref_s = time.perf_counter() - t
    cfg = DPOConfig(lr=5e-5, batch_size=args.batch, log_every=1)
    times = []
    last = [time.perf_counter()]

    def progress(step, total, loss):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    train_dpo(model, "policy", prefs, ref, cfg, tok.pad_token_id, steps=args.steps + 1, progress=progress)
    return {
        "method": "ours",
        "gen_tokens_per_s": tokens / gen_s,
        "gen_tokens": tokens,
        "step_s": sum(times[1:]) / len(times[1:]),  # the first step warms up allocators
        "ref_s_per_pair": ref_s / len(prefs),
        "peak_rss_mb": _rss_mb(),
    }


def measure_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from fedbiscuit.rlhf.generation import render_prompt

    torch.manual_seed(0)
    model, tok = _model(args)
    pairs = _pairs(args)
    rows = {
        "prompt": [render_prompt(tok, p.prompt, True) for p in pairs],
        "chosen": [p.chosen for p in pairs],
        "rejected": [p.rejected for p in pairs],
    }
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    out = Path(os.environ.get("TMPDIR", "/tmp")) / "fedbiscuit-trl-bench"
    cfg = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=args.batch,
        max_steps=args.steps + 1,
        learning_rate=5e-5,
        beta=0.1,
        use_cpu=True,
        report_to=[],
        logging_steps=1000,
        save_strategy="no",
        max_length=512,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=model,
        args=cfg,
        train_dataset=Dataset.from_dict(rows),
        processing_class=tok,
        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]),
        callbacks=[Timer()],
    )
    trainer.train()
    return {
        "method": "trl DPOTrainer",
        "step_s": sum(times[1:]) / len(times[1:]),
        "peak_rss_mb": _rss_mb(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded")
    p.add_argument(
        "--data", default=os.environ.get("FEDBISCUIT_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--only", choices=["ours", "trl"])
    args = p.parse_args()
    if args.only:
        print(json.dumps((measure_ours if args.only == "ours" else measure_trl)(args)))
        return
    results = []
    for method in ("ours", "trl"):
        cmd = [
            sys.executable,
            __file__,
            "--only",
            method,
            "--model",
            args.model,
            "--data",
            args.data,
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
            "--new-tokens",
            str(args.new_tokens),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    ours, trl = results
    print(
        f"generation: {ours['gen_tokens']} new tokens, {ours['gen_tokens_per_s']:.1f} tokens/s "
        f"(8 prompts x 2 samples, batch 8, {args.new_tokens} max new tokens)"
    )
    print(f"reference log-probs (ours, once per pair): {ours['ref_s_per_pair']:.2f} s per pair\n")
    print(f"| method | DPO step (s), batch {args.batch} pairs | peak RSS (MB) |")
    print("|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['step_s']:.2f} | {r['peak_rss_mb']:.0f} |")
    print(
        f"\nours is {trl['step_s'] / ours['step_s']:.2f}x trl's step time "
        f"(ours excludes the one-off reference pass: {ours['ref_s_per_pair'] * args.batch:.2f} s per batch)"
    )


if __name__ == "__main__":
    main()
