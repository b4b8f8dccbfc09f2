"""Several processes (Accelerate's launcher, here two CPU processes over gloo) train one centralized selector:
the adapter equals the one a single process trains on the same data, to float tolerance."""

from __future__ import annotations

import os

import pytest
import torch

from fedbiscuit.config import LoraSettings, TrainConfig
from fedbiscuit.data.pairs import Comparison
from fedbiscuit.models.adapters import adapter_state, add_adapter
from fedbiscuit.models.tiny import tiny_model
from fedbiscuit.selector.encoding import PairEncoder
from fedbiscuit.selector.prompts import Template, answer_token_ids
from fedbiscuit.selector.training import train_selector

TEMPLATE = Template.parse("Q:\n{prompt}\nReply A:\n{response_a}\nReply B:\n{response_b}\nBetter?\nAnswer:")
CFG = TrainConfig(lr=1e-2, batch_size=5, grad_accum=2, steps=4, schedule="cosine", warmup_steps=1)


def _train(out_dir: str | None = None) -> dict:
    from fedbiscuit import distributed

    distributed.join()
    torch.manual_seed(0)
    model, tok = tiny_model(seed=0, layers=2)
    model = add_adapter(model, "selector", LoraSettings(r=4, alpha=8, dropout=0.0), seed=1)
    enc = PairEncoder(tok, TEMPLATE, max_length=64)
    pairs = enc.encode(
        [
            Comparison(f"item {i} " * (1 + i % 3), "yes " * (1 + i % 2), "no", float(i % 2), "c", "t")
            for i in range(13)
        ]
    )
    result = train_selector(model, enc, pairs, CFG, answer_token_ids(tok), seed=3)
    state = {k: v.clone() for k, v in adapter_state(model, "selector").items()}
    if out_dir is not None:
        rank, world = distributed.world()
        torch.save(
            {"state": state, "samples": result.samples, "world": world, "loss": result.loss},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    return {"state": state, "samples": result.samples, "loss": result.loss}


def test_two_processes_train_the_adapter_one_process_trains(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    single = _train()
    accelerate.debug_launcher(_train, args=(str(tmp_path),), num_processes=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    for r in ranks:
        assert r["samples"] == single["samples"]  # every pair of every batch, counted once (not per process)
        assert r["loss"] == pytest.approx(single["loss"], rel=1e-5)
        for name, value in single["state"].items():
            torch.testing.assert_close(r["state"][name], value, atol=1e-6, rtol=1e-5)
    assert any((v != 0).any() for k, v in single["state"].items() if "lora_B" in k)  # it trained
