"""Phase 2 cost: generation tokens/s, and a DPO step ours against trl's DPOTrainer, measured in one run.

ours: texts tokenised once, reference log-probabilities computed once up front (the reference is the base with
      the adapter disabled and never changes), the output layer applied only at response tokens.
trl:  DPOTrainer as a user would set it up for this job: a peft LoraConfig (its reference is the same model with
      the adapter disabled, computed at every step), fp32 on CPU and no gradient checkpointing (trl's
      DPOConfig defaults to bf16 and gradient checkpointing, both slower here), defaults otherwise.

Both train a LoRA r=8 (q_proj, v_proj) policy on the same HH-RLHF pairs, batch 4 pairs, fp32 on CPU. Each
method lives in its own worker process (so its peak RSS is its own), both are loaded first, and then the steps
alternate: ours, trl, trl, ours, ... one step at a time, so both run under the same load. Every step is timed
inside its worker and reported as measured. Prints a Markdown table.

    python benchmarks/phase2_cost.py                 # SmolLM2
    python benchmarks/phase2_cost.py --model tiny    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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


# ------------------------------------------------------------------------- lockstep protocol
# A worker prints "@@" + JSON lines (anything else on stdout is a library talking) and, before each step,
# waits for a "go" line from the parent on stdin.
def _emit(record: dict) -> None:
    print("@@" + json.dumps(record), flush=True)


def _wait_for_go() -> None:
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("the parent went away")


def worker_ours(args) -> None:
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
    _emit({"ready": True, "pairs": len(prefs)})
    cfg = DPOConfig(lr=5e-5, batch_size=args.batch, log_every=1)
    began = [0.0]

    def progress(step, total, loss):
        _emit({"step": step, "seconds": time.perf_counter() - began[0]})
        if step < total:
            _wait_for_go()
            began[0] = time.perf_counter()

    _wait_for_go()
    began[0] = time.perf_counter()
    train_dpo(model, "policy", prefs, ref, cfg, tok.pad_token_id, steps=args.steps + 1, progress=progress)
    _emit(
        {
            "done": True,
            "gen_tokens_per_s": tokens / gen_s,
            "gen_tokens": tokens,
            "ref_s_per_pair": ref_s / len(prefs),
            "peak_rss_mb": _rss_mb(),
        }
    )


def worker_trl(args) -> None:
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

    class Lockstep(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            _emit({"ready": True, "pairs": len(pairs)})

        def on_step_begin(self, args, state, control, **kwargs):
            _wait_for_go()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _emit({"step": state.global_step, "seconds": time.perf_counter() - self.t})

    out = Path(os.environ.get("TMPDIR", "/tmp")) / "fedbiscuit-trl-bench"
    cfg = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=args.batch,
        max_steps=args.steps + 1,
        learning_rate=5e-5,
        beta=0.1,
        use_cpu=True,
        bf16=False,  # fp32, as ours (trl's default bf16 is slow on CPU)
        gradient_checkpointing=False,  # trl's default recomputes activations: memory for time, not needed here
        precompute_ref_log_probs=False,  # the default: the adapter-disabled reference runs at every step
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
        callbacks=[Lockstep()],
    )
    trainer.train()
    _emit({"done": True, "peak_rss_mb": _rss_mb()})


class Worker:
    def __init__(self, method: str, args):
        cmd = [sys.executable, __file__, "--worker", method, "--model", args.model, "--data", args.data]
        cmd += ["--batch", str(args.batch), "--steps", str(args.steps), "--new-tokens", str(args.new_tokens)]
        self.method = method
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"the {self.method} worker ended early (exit code {self.proc.wait()})")

    def step(self) -> float:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self.read()["seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded")
    p.add_argument(
        "--data", default=os.environ.get("FEDBISCUIT_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--worker", choices=["ours", "trl"])
    args = p.parse_args()
    if args.worker:
        (worker_ours if args.worker == "ours" else worker_trl)(args)
        return
    workers = [Worker("ours", args), Worker("trl", args)]
    try:
        for w in workers:
            ready = w.read()
            assert ready.get("ready"), ready
        times: dict[str, list[float]] = {"ours": [], "trl": []}
        for step in range(args.steps + 1):  # step 0 warms up allocators in both; it is reported apart
            for w in workers if step % 2 == 0 else reversed(workers):  # ours, trl, trl, ours, ...
                times[w.method].append(w.step())
        ours, trl = (w.read() for w in workers)
    finally:
        for w in workers:
            w.proc.kill()
    print(
        f"generation: {ours['gen_tokens']} new tokens, {ours['gen_tokens_per_s']:.1f} tokens/s "
        f"(8 prompts x 2 samples, batch 8, {args.new_tokens} max new tokens)"
    )
    print(f"reference log-probs (ours, once per pair): {ours['ref_s_per_pair']:.2f} s per pair\n")
    print(
        f"| method | DPO step (s), batch {args.batch} pairs: mean, median of {args.steps} | "
        "first step (s) | every step (s) | peak RSS (MB) |"
    )
    print("|---|---|---|---|---|")
    for name, label, done in (("ours", "ours", ours), ("trl", "trl DPOTrainer", trl)):
        t = times[name]
        steps = ", ".join(f"{x:.2f}" for x in t[1:])
        print(
            f"| {label} | {statistics.mean(t[1:]):.2f}, {statistics.median(t[1:]):.2f} | {t[0]:.2f} | {steps} | "
            f"{done['peak_rss_mb']:.0f} |"
        )
    ratio = statistics.mean(times["trl"][1:]) / statistics.mean(times["ours"][1:])
    print(
        f"\ntrl's mean step takes {ratio:.2f}x ours (ours excludes its one-off reference pass: "
        f"{ours['ref_s_per_pair'] * args.batch:.2f} s per batch of {args.batch})"
    )


if __name__ == "__main__":
    main()
