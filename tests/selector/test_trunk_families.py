"""The cached path on every decoder family transformers ships for the paper's models (and neighbours): answer
logits and LoRA gradients equal the full forward, on tiny random models built from each family's config, with
sequences longer than the sliding windows those families have."""

from __future__ import annotations

import pytest
import torch

from fedbiscuit.config import LoraSettings
from fedbiscuit.data.pairs import Comparison
from fedbiscuit.models.adapters import add_adapter
from fedbiscuit.models.tiny import FAMILIES, tiny_model
from fedbiscuit.selector.encoding import PairEncoder
from fedbiscuit.selector.prompts import Template, answer_token_ids
from fedbiscuit.selector.trunk import CachedEncoder

TEMPLATE = Template.parse("Q:\n{prompt}\nReply A:\n{response_a}\nReply B:\n{response_b}\nBetter?\nAnswer:")
TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj"]}


def _pairs():
    return [
        Comparison(
            f"Human: tell me about item {i} " + "and more " * i,
            "the answer is yes " * (1 + i % 3),
            "no " * (2 + i),
            float(i % 2),
            "c",
            "test",
        )
        for i in range(5)
    ]


WINDOWED = sorted(f for f, cfg in FAMILIES.items() if "sliding_window" in cfg)
CASES = [(f, None) for f in sorted(FAMILIES)] + [(f, 4096) for f in WINDOWED]


@pytest.mark.parametrize(("family", "window"), CASES)
def test_cached_path_equals_the_full_forward(family, window, tmp_path):
    """A window shorter than the sequences (16) runs both orders whole; a longer one (4096) shares the prefix."""
    model, tok = tiny_model(seed=0, layers=4, family=family, **({"sliding_window": window} if window else {}))
    targets = TARGETS.get(family, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"])
    model = add_adapter(
        model, "selector", LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=targets, top_layers=2)
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero: give the adapter values so it changes the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    choice = answer_token_ids(tok)
    full = PairEncoder(tok, TEMPLATE, max_length=200)
    cached = CachedEncoder(tok, TEMPLATE, 200, model, top_layers=2, root=tmp_path)
    assert cached.share_prefix == (family not in WINDOWED or window is not None)
    pairs = cached.encode(_pairs())
    assert max(full.length(p) for p in pairs) > 3 * 16  # longer than the sliding windows (16) of the configs

    model.train()
    out = []
    for enc in (full, cached):
        model.zero_grad()
        logits, target = enc.logits(model, pairs, True, choice)
        torch.nn.functional.cross_entropy(logits, torch.stack([target, 1 - target], 1)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out.append((logits.detach(), grads))
    (ref, ref_grads), (got, got_grads) = out
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert got_grads.keys() == ref_grads.keys() and len(ref_grads) == 2 * 2 * len(targets)
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], atol=1e-5, rtol=1e-5)
    assert ref.std() > 1e-3 and any(g.abs().max() > 1e-4 for g in ref_grads.values())
