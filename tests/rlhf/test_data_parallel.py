"""Phase 2 under a launcher (here Accelerate's debug launcher: two CPU processes over gloo): generation splits
its batches across the processes and gathers them, DPO splits every micro-batch and sums the gradients; both
give what one process gives on the same data."""

from __future__ import annotations

import os

import pytest
import torch

from fedbiscuit.config import DPOConfig, GenerationConfig, LoraSettings
from fedbiscuit.models.adapters import adapter_state, add_adapter
from fedbiscuit.models.tiny import tiny_model
from fedbiscuit.rlhf.baselines import HumanPair
from fedbiscuit.rlhf.dpo import encode_preferences, reference_logps, train_dpo
from fedbiscuit.rlhf.generation import sample

# 7 pairs in micro-batches of 3 with 2 accumulated: uneven shares, and a last micro-batch of one pair
DPO = DPOConfig(lr=5e-3, batch_size=3, grad_accum=2, epochs=3, log_every=1)
GEN = GenerationConfig(chat_template=False, max_new_tokens=6, batch_size=2)


def _work(out_dir: str | None = None) -> dict:
    import fedbiscuit.rlhf.dpo as dpo
    from fedbiscuit import distributed

    distributed.join()
    model, tok = tiny_model(seed=0, layers=2)
    model = add_adapter(model, "policy", LoraSettings(r=4, alpha=8, dropout=0.0), seed=2)
    # what this process itself computed: prompts generated for, pairs trained on
    work = {"generated": 0, "trained": 0}
    generate, pair_logps = model.generate, dpo.pair_logps

    def counted_generate(*args, **kwargs):
        work["generated"] += kwargs["input_ids"].shape[0]
        return generate(*args, **kwargs)

    def counted_pair_logps(m, batch, *args, **kwargs):
        work["trained"] += len(batch) * torch.is_grad_enabled()  # the reference pass runs without gradients
        return pair_logps(m, batch, *args, **kwargs)

    model.generate, dpo.pair_logps = counted_generate, counted_pair_logps
    prompts = [f"question number {i}?" for i in range(5)]  # 3 generation batches of 2: uneven shares
    samples = sample(model, tok, prompts, GEN, n=2, adapter=None, seed=4)
    pairs = [HumanPair(f"question {i}?" + " more" * (i % 3), "yes indeed", "no") for i in range(7)]
    prefs = encode_preferences(tok, pairs, GEN)
    ref = reference_logps(model, prefs, tok.pad_token_id)
    result = train_dpo(model, "policy", prefs, ref, DPO, tok.pad_token_id, seed=1)
    out = {
        "texts": samples.texts,
        "tokens": samples.tokens,
        "state": {k: v.clone() for k, v in adapter_state(model, "policy").items()},
        "loss": result.loss,
        "history": result.history,
        "world": distributed.world()[1],
        **work,
    }
    dpo.pair_logps = pair_logps
    if out_dir is not None:
        torch.save(out, os.path.join(out_dir, f"rank{distributed.world()[0]}.pt"))
    return out


def test_two_processes_sample_and_train_what_one_process_does(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    single = _work()
    accelerate.debug_launcher(_work, args=(str(tmp_path),), num_processes=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    for r in ranks:
        # the same samples in the same order: each process generated every other batch, seeded as one would
        assert r["texts"] == single["texts"] and r["tokens"] == single["tokens"]
        assert r["loss"] == pytest.approx(single["loss"], rel=1e-5)
        for got, want in zip(r["history"], single["history"], strict=True):
            # the step's statistics are over all its pairs (gathered), not over one process's share
            assert got["reward_accuracy"] == pytest.approx(want["reward_accuracy"])
            assert got["reward_margin"] == pytest.approx(want["reward_margin"], rel=1e-4, abs=1e-6)
        for name, value in single["state"].items():
            torch.testing.assert_close(r["state"][name], value, atol=1e-6, rtol=1e-5)
    assert any((v != 0).any() for k, v in single["state"].items() if "lora_B" in k)  # it trained
    # and the work was shared, not repeated: batches 0 and 2 (3 prompts) on rank 0, batch 1 (2) on rank 1
    assert (single["generated"], [r["generated"] for r in ranks]) == (5, [3, 2])
    assert sum(r["trained"] for r in ranks) == single["trained"] > max(r["trained"] for r in ranks) > 0
