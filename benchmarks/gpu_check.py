"""What a lent GPU should measure, prepared as one run of under 10 minutes (issue 17).

Per model, on the device, bf16:
  smollm2         SmolLM2-135M-Instruct from the embedded GGUF
  gemma2b-shaped  Gemma's architecture at Gemma-2B's sizes (18 blocks, width 2,048, MLP 16,384, 8 heads, 1 KV
                  head of 256, a 256,000-row vocabulary: 2.5e9 parameters) with random weights and the byte-level
                  test tokenizer: no hub access is needed, and the cost is the real model's
  tiny            the unit tests' tiny Llama (a smoke run of this script on any machine)
it measures the selector on the full and the cached path (LoRA r=16 on q/k/v/o of the top 4 blocks, HH pairs,
max_length 256): cache build pairs/s, training sequences/s, scoring pairs/s and peak device memory; and phase 2:
generation tokens/s (2 samples per prompt, 64 new tokens, a LoRA r=8 policy) and a DPO step's seconds (4 pairs)
with its peak memory. On CUDA it then runs the determinism test that needs a GPU. Prints a Markdown table.

    python benchmarks/gpu_check.py --json runs/bench/gpu_check.json              # on the GPU
    python benchmarks/gpu_check.py --device cpu --models tiny --steps 2 --pairs 16  # a smoke run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
from common import ROOT, write_json

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build(name: str, device: str, dtype: torch.dtype, layers: int = 18):
    from transformers import AutoConfig, AutoModelForCausalLM

    from fedbiscuit.config import config_from_dict
    from fedbiscuit.models.loading import load_model
    from fedbiscuit.models.tiny import tiny_model, tiny_tokenizer

    if name == "smollm2":
        cfg = config_from_dict({"model": {"name_or_path": "embedded", "device": device, "dtype": "bfloat16"}})
        return load_model(cfg.model)
    if name == "tiny":
        model, tok = tiny_model(seed=0, layers=4)
        return model.to(device=device, dtype=dtype), tok
    tok = tiny_tokenizer()
    config = AutoConfig.for_model(
        "gemma",
        vocab_size=256_000,
        hidden_size=2048,
        intermediate_size=16_384,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
        max_position_embeddings=8192,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), tok


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_mb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def _reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def measure(name: str, args) -> list[dict]:
    from fedbiscuit.config import (
        DPOConfig,
        GenerationConfig,
        LoraSettings,
        SelectorConfig,
        TrainConfig,
        config_from_dict,
    )
    from fedbiscuit.data import prepare_data
    from fedbiscuit.models.adapters import add_adapter
    from fedbiscuit.rlhf.baselines import HumanPair
    from fedbiscuit.rlhf.dpo import encode_preferences, reference_logps, train_dpo
    from fedbiscuit.rlhf.generation import sample
    from fedbiscuit.selector import build_encoder
    from fedbiscuit.selector.training import score_pairs, train_selector

    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    start = time.perf_counter()
    model, tok = build(name, args.device, dtype)
    load_s = time.perf_counter() - start
    data = prepare_data(
        config_from_dict({"data": {"source": "hh_rlhf", "root": args.data, "heldout_fraction": 0.0}}).data,
        seed=0,
    )
    per = max(1, args.pairs // len(data.clients))
    train_raw = [p for c in data.clients.values() for p in c.train[:per]]
    test_raw = [p for pairs in data.all_test().values() for p in pairs[:per]]
    rows = []
    for path in ("full", "cached"):
        lora = LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=QKVO, top_layers=4)
        model = add_adapter(model, f"selector_{path}", lora, seed=0)
        enc, choice = build_encoder(
            tok,
            SelectorConfig(max_length=256, path=path),
            "hh_rlhf",
            model=model,
            lora=lora,
            cache_dir=tempfile.mkdtemp(prefix="trunk-"),
        )
        _reset(args.device)
        start = time.perf_counter()
        train, test = enc.encode(train_raw), enc.encode(test_raw)
        _sync(args.device)
        build_s = time.perf_counter() - start
        cfg = TrainConfig(lr=1e-4, batch_size=8, steps=args.steps)
        train_selector(model, enc, train, cfg.model_copy(update={"steps": 1}), choice, seed=1)  # warm-up
        _sync(args.device)
        start = time.perf_counter()
        result = train_selector(model, enc, train, cfg, choice, seed=0)
        _sync(args.device)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        score_pairs(model, enc, test, choice, 32)
        _sync(args.device)
        score_s = time.perf_counter() - start
        rows.append(
            {
                "model": name,
                "part": f"selector, {path} path",
                "load_s": round(load_s, 1),
                "cache_build_pairs_per_s": round(len(train + test) / build_s, 1)
                if path == "cached"
                else None,
                "train_seq_per_s": round(2 * result.samples / train_s, 1),
                "score_pairs_per_s": round(len(test) / score_s, 1),
                "peak_mb": _peak_mb(args.device),
            }
        )
        print(rows[-1], flush=True)

    model = add_adapter(
        model, "policy", LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    gen = GenerationConfig(max_new_tokens=64, batch_size=8, chat_template=name == "smollm2")
    prompts = [p.prompt for p in test_raw[: args.prompts]]
    _reset(args.device)
    sample(model, tok, prompts[:2], gen, n=2, adapter="policy", seed=1)  # warm-up
    _sync(args.device)
    start = time.perf_counter()
    cands = sample(model, tok, prompts, gen, n=2, adapter="policy", seed=0)
    _sync(args.device)
    gen_s = time.perf_counter() - start
    tokens = sum(sum(n) for n in cands.new_tokens)
    prefs = encode_preferences(
        tok, [HumanPair(p, t[0], t[1]) for p, t in zip(prompts, cands.texts, strict=True)], gen
    )
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ref = reference_logps(model, prefs, pad)
    dpo = DPOConfig(batch_size=4, lr=1e-5)
    train_dpo(model, "policy", prefs, ref, dpo, pad, steps=1)  # warm-up
    _sync(args.device)
    start = time.perf_counter()
    train_dpo(model, "policy", prefs, ref, dpo, pad, steps=args.steps)
    _sync(args.device)
    rows.append(
        {
            "model": name,
            "part": "phase 2",
            "generation_tokens_per_s": round(tokens / gen_s, 1),
            "dpo_step_s": round((time.perf_counter() - start) / args.steps, 3),
            "peak_mb": _peak_mb(args.device),
        }
    )
    print(rows[-1], flush=True)
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--models", default="smollm2,gemma2b-shaped")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--pairs", type=int, default=128, help="train and test pairs each, over the HH subsets")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument(
        "--data", default=os.environ.get("FEDBISCUIT_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    )
    p.add_argument("--json", help="write the rows here too")
    args = p.parse_args()
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    rows = [r for name in args.models.split(",") for r in measure(name, args)]
    print(f"device: {device_name}, dtype {args.dtype}, torch {torch.__version__}")
    print(
        "| model | part | cache build pairs/s | train seq/s | score pairs/s | generation tok/s | DPO step (s) | peak memory (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [
            r.get(k)
            for k in (
                "cache_build_pairs_per_s",
                "train_seq_per_s",
                "score_pairs_per_s",
                "generation_tokens_per_s",
                "dpo_step_s",
                "peak_mb",
            )
        ]
        print(
            f"| {r['model']} | {r['part']} | "
            + " | ".join("-" if c is None else f"{c:,.1f}" if isinstance(c, float) else str(c) for c in cells)
            + " |"
        )
    write_json(args.json, {"device": device_name, "rows": rows})
    if args.device.startswith("cuda"):
        test = "tests/federated/test_local_engine.py::test_deterministic_resume_on_cuda_replays_exactly"
        sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", test], cwd=ROOT))


if __name__ == "__main__":
    main()
