import pytest
import torch

from fedbiscuit.config import LoraSettings, ModelConfig
from fedbiscuit.data.pairs import Comparison
from fedbiscuit.models.adapters import add_adapter
from fedbiscuit.selector.encoding import PairEncoder
from fedbiscuit.selector.prompts import Template, answer_token_ids
from fedbiscuit.selector.scoring import choice_logits, full_vocab_choice_logits


def _batch(tok):
    enc = PairEncoder(tok, Template.parse("generic"), 512)
    pairs = enc.encode(
        [
            Comparison("short", "a", "b", 1.0, "c", "t"),
            Comparison("a much longer prompt " * 4, "first answer here", "second", 0.0, "c", "t"),
        ]
    )
    return enc, pairs, enc.batch(pairs, both_orders=True)


def test_two_row_head_equals_full_vocabulary_logits(tiny):
    model, tok = tiny
    model = add_adapter(model, "s", LoraSettings(r=4), seed=0)
    with torch.no_grad():  # make the adapter non-trivial so the check covers the LoRA path
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    _, _, (ids, mask, _) = _batch(tok)
    choice = answer_token_ids(tok)
    with torch.no_grad():
        fast = choice_logits(model, ids, mask, choice)
        slow = full_vocab_choice_logits(model, ids, mask, choice)
    assert fast.shape == (4, 2)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_a_score(tiny):
    model, tok = tiny
    enc, pairs, (ids, mask, _) = _batch(tok)
    choice = answer_token_ids(tok)
    with torch.no_grad():
        batched = choice_logits(model, ids, mask, choice)
        alone_ids, alone_mask, _ = enc.batch(pairs[:1], both_orders=False)
        alone = choice_logits(model, alone_ids, alone_mask, choice)
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=1e-5)


def test_softcapping_is_applied(tiny):
    model, tok = tiny
    _, _, (ids, mask, _) = _batch(tok)
    choice = answer_token_ids(tok)
    with torch.no_grad():
        plain = choice_logits(model, ids, mask, choice)
        model.config.final_logit_softcapping = 0.01
        capped = choice_logits(model, ids, mask, choice)
    torch.testing.assert_close(capped, torch.tanh(plain / 0.01) * 0.01)


def test_smollm2_fast_head_matches_full_logits():
    """On the real embedded model: single answer tokens, and the 2-row head equals the full logits."""
    from fedbiscuit.models.loading import load_model

    model, tok = load_model(ModelConfig(device="cpu"))
    a, b = answer_token_ids(tok)
    assert (tok.decode([a]), tok.decode([b])) == (" A", " B")
    model = add_adapter(model, "s", LoraSettings(), seed=0)
    enc = PairEncoder(tok, Template.parse("dialogue"), 256)
    pairs = enc.encode(
        [Comparison("Human: Is the sky blue?\n\nAssistant:", "Yes, on a clear day.", "No.", 1.0, "c", "t")]
    )
    ids, mask, _ = enc.batch(pairs, both_orders=True)
    with torch.no_grad():
        torch.testing.assert_close(
            choice_logits(model, ids, mask, (a, b)),
            full_vocab_choice_logits(model, ids, mask, (a, b)),
            atol=1e-4,
            rtol=1e-4,
        )


@pytest.mark.parametrize("target", [["lm_head"]])
def test_lora_on_the_head_is_refused(tiny, target):
    model, tok = tiny
    model = add_adapter(model, "s", LoraSettings(target_modules=target), seed=0)
    _, _, (ids, mask, _) = _batch(tok)
    with pytest.raises(TypeError, match="lm_head"):
        choice_logits(model, ids, mask, answer_token_ids(tok))
