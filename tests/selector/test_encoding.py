import pytest
import torch

from fedbiscuit.data.pairs import Comparison
from fedbiscuit.selector.encoding import PAD_MULTIPLE, PairEncoder
from fedbiscuit.selector.prompts import TEMPLATES, Template


def _pair(prompt="Human: hi there\n\nAssistant:", a="Sure, here it is.", b="No.", label=1.0):
    return Comparison(prompt, a, b, label, "c", "t")


def test_sequence_matches_whole_string_tokenisation(tiny):
    _, tok = tiny
    t = Template.parse("dialogue")
    enc = PairEncoder(tok, t, 4096)
    (p,) = enc.encode([_pair()])
    assert (
        enc.sequence(p, swap=False) == tok(t.render(*[_pair().prompt, "Sure, here it is.", "No."])).input_ids
    )
    assert enc.sequence(p, swap=True) == tok(t.render(_pair().prompt, "No.", "Sure, here it is.")).input_ids


def test_both_orders_flip_the_target_and_pad_right(tiny):
    _, tok = tiny
    enc = PairEncoder(tok, Template.parse("generic"), 4096)
    pairs = enc.encode([_pair(label=1.0), _pair(a="longer answer " * 5, label=0.25)])
    ids, mask, target = enc.batch(pairs, both_orders=True)
    assert target.tolist() == [1.0, 0.25, 0.0, 0.75]
    assert ids.shape[0] == 4 and mask.sum(1).tolist() == [
        len(enc.sequence(p, s)) for s in (False, True) for p in pairs
    ]
    assert (ids[mask == 0] == enc.pad_id).all()
    assert ids.shape[1] % PAD_MULTIPLE == 0 and ids.shape[1] - PAD_MULTIPLE < mask.sum(1).max()


def test_truncation_cuts_context_first_then_responses_evenly(tiny):
    _, tok = tiny
    t = Template.parse("Q:{prompt}\nA:{response_a}\nB:{response_b}\nAnswer:")
    fixed = sum(len(x) for x in PairEncoder(tok, t, 4096).pieces)
    enc = PairEncoder(tok, t, fixed + 30)
    (p,) = enc.encode([_pair(prompt="old context " * 10 + "END", a="x" * 8, b="y" * 8)])
    seq = tok.decode(enc.sequence(p, False))
    assert seq.endswith("Answer:") and "x" * 8 in seq and "y" * 8 in seq and "END" in seq
    assert len(enc.sequence(p, False)) == fixed + 30
    assert enc.truncated["context"] == 1 and enc.truncated["responses"] == 0
    (q,) = enc.encode([_pair(prompt="ctx", a="x" * 40, b="y" * 10)])
    seq = enc.sequence(q, False)
    assert len(seq) == fixed + 30
    text = tok.decode(seq)
    assert "y" * 10 in text and "x" * 20 in text and "ctx" not in text  # both responses stay visible
    assert enc.truncated["responses"] == 1


def test_max_length_below_template_is_an_error(tiny):
    _, tok = tiny
    try:
        PairEncoder(tok, Template.parse("dialogue"), 20)
    except ValueError as err:
        assert "selector.max_length=20" in str(err)
    else:
        raise AssertionError("expected an error")


def test_encode_tokenises_each_text_once(tiny, monkeypatch):
    _, tok = tiny
    enc = PairEncoder(tok, Template.parse("generic"), 4096)
    calls = []
    original = tok.__class__.__call__

    def counting(self, text, *a, **k):
        calls.append(len(text) if isinstance(text, list) else 1)
        return original(self, text, *a, **k)

    monkeypatch.setattr(tok.__class__, "__call__", counting)
    pairs = enc.encode([_pair(), _pair(a="other")])
    enc.batch(pairs, both_orders=True)
    enc.batch(pairs, both_orders=True)
    assert calls == [2, 2, 2]  # prompts, A, B; assembling batches tokenises nothing
    assert isinstance(enc.batch(pairs, both_orders=False)[0], torch.Tensor)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_templates_tokenise_like_whole_strings(tiny, name):
    _, tok = tiny
    t = Template.parse(name)
    enc = PairEncoder(tok, t, 4096)
    c = Comparison("Human: hi there, how are you?\n\nAssistant:", "Sure, here it is.", "No.", 1.0, "c", "t")
    (p,) = enc.encode([c])
    assert enc.sequence(p, False) == tok(t.render(c.prompt, c.response_a, c.response_b)).input_ids


def test_templates_tokenise_like_whole_strings_on_smollm2():
    from transformers import AutoTokenizer

    from fedbiscuit.config import ModelConfig
    from fedbiscuit.models.loading import convert_gguf, embedded_gguf

    tok = AutoTokenizer.from_pretrained(convert_gguf(embedded_gguf(), ModelConfig()))
    for name in TEMPLATES:
        t = Template.parse(name)
        enc = PairEncoder(tok, t, 4096)
        c = Comparison(
            "SUBREDDIT: r/x\nTITLE: t\nPOST: Human: hi there?\n\nAssistant:",
            "Sure, it is.",
            "No.",
            1.0,
            "c",
            "t",
        )
        (p,) = enc.encode([c])
        assert enc.sequence(p, True) == tok(t.render(c.prompt, c.response_b, c.response_a)).input_ids, name
