"""The cached selector path: same logits and gradients as the full forward, a store that resumes and refuses
foreign states, and the training/scoring entry points running on it."""

from __future__ import annotations

import json

import pytest
import torch

from fedbiscuit.config import LoraSettings, TrainConfig
from fedbiscuit.data.pairs import Comparison
from fedbiscuit.models.adapters import add_adapter
from fedbiscuit.models.tiny import tiny_model
from fedbiscuit.selector.encoding import PairEncoder
from fedbiscuit.selector.prompts import Template, answer_token_ids
from fedbiscuit.selector.training import score_pairs, train_selector
from fedbiscuit.selector.trunk import CachedEncoder, TrunkUnsupportedError, pair_key

LORA = LoraSettings(
    r=4,
    alpha=8,
    dropout=0.0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
    top_layers=2,
)
# short pieces: the tiny byte-level tokenizer spends a token per character
TEMPLATE = Template.parse("Q:\n{prompt}\nReply A:\n{response_a}\nReply B:\n{response_b}\nBetter?\nAnswer:")


def _model(seed=0):
    model, tok = tiny_model(seed=seed, layers=4)
    model = add_adapter(model, "selector", LORA, seed=1)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # LoRA B starts at zero; give it values so the adapter really changes the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model, tok


def _pairs(n=6):
    pairs = []
    for i in range(n):
        prompt = f"Human: tell me about item {i} " + "and more " * (i % 4)
        pairs.append(
            Comparison(
                prompt, "the answer is yes " * (1 + i % 3), "no " * (2 + i % 2), float(i % 2), "c", "test"
            )
        )
    return pairs


def test_lora_only_in_top_blocks():
    model, _ = _model()
    blocks = {int(n.split("layers.")[1].split(".")[0]) for n, _ in model.named_parameters() if "lora_" in n}
    assert blocks == {2, 3}


def test_cached_logits_and_gradients_equal_the_full_forward(tmp_path):
    model, tok = _model()
    choice = answer_token_ids(tok)
    full = PairEncoder(tok, TEMPLATE, max_length=96)  # short: some pairs are truncated
    cached = CachedEncoder(tok, TEMPLATE, 96, model, top_layers=2, root=tmp_path)
    pairs = cached.encode(_pairs())
    assert [pair_key(p) for p in full.encode(_pairs())] == [pair_key(p) for p in pairs]
    assert cached.stats["built"] == len(pairs) and full.truncated  # truncation is part of what is cached

    model.train()
    grads = []
    for enc in (full, cached):
        model.zero_grad()
        logits, target = enc.logits(model, pairs, True, choice)
        torch.nn.functional.cross_entropy(logits, torch.stack([target, 1 - target], 1)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if enc is full:
            ref_logits = logits.detach()
        else:
            got_logits = logits.detach()
    torch.testing.assert_close(got_logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * len(LORA.target_modules) * 2
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-5)
    assert any(g.abs().max() > 1e-4 for g in grads[0].values())  # the comparison is not of zeros
    with torch.no_grad():  # one order only (scoring without the swap): no second pass
        one, _ = cached.logits(model, pairs, False, choice)
        torch.testing.assert_close(one, full.logits(model, pairs, False, choice)[0], atol=1e-5, rtol=1e-5)


def test_store_is_reused_and_keyed_by_content(tmp_path):
    model, tok = _model()
    enc = CachedEncoder(tok, TEMPLATE, 96, model, top_layers=2, root=tmp_path)
    enc.encode(_pairs(4))
    again = CachedEncoder(tok, TEMPLATE, 96, model, top_layers=2, root=tmp_path)
    again.encode(_pairs(6))
    assert again.stats == {"built": 2, "found": 4}
    # another split point, truncation or template is another folder
    CachedEncoder(tok, TEMPLATE, 64, model, top_layers=2, root=tmp_path).encode(_pairs(1))
    CachedEncoder(tok, TEMPLATE, 96, model, top_layers=1, root=tmp_path).encode(_pairs(1))
    assert len([d for d in tmp_path.iterdir() if d.is_dir()]) == 3
    # other frozen weights: another folder too
    other, _ = _model(seed=5)
    assert (
        CachedEncoder(tok, TEMPLATE, 96, other, top_layers=2, root=tmp_path).store.folder != enc.store.folder
    )


def test_torn_tail_is_dropped_and_build_resumes(tmp_path):
    model, tok = _model()
    enc = CachedEncoder(tok, TEMPLATE, 96, model, top_layers=2, root=tmp_path)
    pairs = enc.encode(_pairs(3))
    ref = [enc.store.get(pair_key(p))[1].clone() for p in pairs]
    size = enc.store.data_path.stat().st_size
    with open(enc.store.data_path, "ab") as fh:  # a crash after writing states but before the index
        fh.write(b"\x00" * 1000)
    again = CachedEncoder(tok, TEMPLATE, 96, model, top_layers=2, root=tmp_path)
    again.encode(_pairs(5))
    assert again.stats == {"built": 2, "found": 3}
    assert again.store.data_path.stat().st_size == again.store.nbytes > size
    for p, r in zip(pairs, ref, strict=True):
        torch.testing.assert_close(again.store.get(pair_key(p))[1], r)


def test_store_refuses_other_settings_in_its_folder(tmp_path):
    model, tok = _model()
    enc = CachedEncoder(tok, TEMPLATE, 96, model, top_layers=2, root=tmp_path)
    meta = enc.store.folder / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "start": 0}))
    with pytest.raises(ValueError, match="other weights or settings"):
        CachedEncoder(tok, TEMPLATE, 96, model, top_layers=2, root=tmp_path)


def test_unsplittable_decoder_is_refused(tmp_path, monkeypatch):
    model, tok = _model()
    import fedbiscuit.selector.trunk as trunk

    real = trunk.decoder_slice

    def broken(model, start, stop, final_norm):  # e.g. a model that scales its input embeddings
        return real(model, start, stop, final_norm) if stop != 4 else real(model, start + 1, stop, final_norm)

    monkeypatch.setattr(trunk, "decoder_slice", broken)
    with pytest.raises(TrunkUnsupportedError, match="selector.path=full"):
        CachedEncoder(tok, TEMPLATE, 96, model, top_layers=2, root=tmp_path)


def test_training_and_scoring_run_on_the_cached_path(tmp_path):
    """Same seed, same pairs: the cached path trains to the same adapter and scores the same as the full one."""
    tok = tiny_model(layers=4)[1]
    choice = answer_token_ids(tok)
    cfg = TrainConfig(lr=1e-2, steps=4, batch_size=4)
    data = _pairs(16)
    results = []
    for cached in (False, True):
        model, _ = _model()
        enc = (
            CachedEncoder(tok, TEMPLATE, 128, model, top_layers=2, root=tmp_path)
            if cached
            else PairEncoder(tok, TEMPLATE, 128)
        )
        pairs = enc.encode(data)
        train_selector(model, enc, pairs, cfg, choice, seed=3)
        results.append(score_pairs(model, enc, pairs, choice, batch_size=5))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-4, rtol=1e-4)
