"""Separately tokenised pieces concatenate to the whole text's ids, also with a SentencePiece tokenizer that adds
a dummy prefix (Llama-2's kind), which would otherwise put a stray word-start marker at every piece boundary.

No Llama-2 or Gemma tokenizer can be fetched here (no hub; no registry package ships one), so the test trains a
small real SentencePiece model with Llama-2's settings (BPE, byte fallback, dummy prefix, no normalisation,
trained line by line) and loads it through transformers' LlamaTokenizer, as a Llama-2 checkpoint's
tokenizer.model is loaded. A vocabulary with pieces that span a newline (Gemma's has "\n\n" and may have
".\n\n") can merge across a piece boundary, which no separate tokenisation reproduces; that case is not
covered here."""

from __future__ import annotations

import json

import pytest

from fedbiscuit.models.tiny import tiny_tokenizer
from fedbiscuit.selector.encoding import PairEncoder, adds_dummy_prefix, continuation_ids
from fedbiscuit.selector.prompts import Template, answer_token_ids

CONVERSATIONS = [
    (
        "Human: How do I bake bread at home?\n\nAssistant: Mix flour, water, salt and yeast.\n\n"
        "Human: How long should it rise?",
        "About 1-2 hours, until it doubles in size.",
        "I don't know.",
    ),
    ("Human: What's 12 x 7?", "84.", "It's 74, I think"),
    ("Human: tell me a joke", "  Why did the chicken cross the road?", "No."),
    ("Human: Résumé tips?\nPlease be brief.", "Keep it to one page; list results.", "\nUse Comic Sans."),
]


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("sp")
    # line by line, as SentencePiece trains (and as Llama-2's vocabulary was made): a newline is never inside a
    # piece, so it is a byte-fallback token (<0x0A>) and never merges with the text around it
    texts = [t for conv in CONVERSATIONS for t in conv] + list(Template.parse("dialogue").pieces)
    corpus = [line for t in texts for line in t.split("\n") if line]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 40),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "legacy": False,
            }
        )
    )
    return AutoTokenizer.from_pretrained(folder)


def test_the_sentencepiece_tokenizer_is_one_with_the_boundary_problem(sp_tokenizer):
    tok = sp_tokenizer
    assert adds_dummy_prefix(tok) and not adds_dummy_prefix(tiny_tokenizer())
    # alone, a text gets a word-start marker it does not have after a newline inside a longer text
    alone = tok("Reply", add_special_tokens=False).input_ids
    inside = tok("A\nReply", add_special_tokens=False).input_ids
    assert alone != inside[-len(alone) :]
    assert continuation_ids(tok, ["Reply"])[0] == inside[-len(continuation_ids(tok, ["Reply"])[0]) :]


@pytest.mark.parametrize("name", ["dialogue", "summary", "generic"])
def test_concatenated_pieces_equal_the_whole_text(sp_tokenizer, name):
    from fedbiscuit.data.pairs import Comparison

    tok = sp_tokenizer
    template = Template.parse(name)
    enc = PairEncoder(tok, template, max_length=10_000)
    pairs = [Comparison(p, a, b, 1.0, "c", "test") for p, a, b in CONVERSATIONS]
    for pair, encoded in zip(pairs, enc.encode(pairs), strict=True):
        for swap in (False, True):
            first, second = (pair.response_b, pair.response_a) if swap else (pair.response_a, pair.response_b)
            whole = tok(
                template.render(pair.prompt, first, second)
            ).input_ids  # with its BOS, as a model sees it
            assert enc.sequence(encoded, swap) == whole
    a, b = answer_token_ids(tok)
    assert a != b


def test_byte_level_tokenizers_take_the_plain_call():
    tok = tiny_tokenizer()
    texts = ["Human: hi", "\n\nReply A:\n", " yes"]
    assert continuation_ids(tok, texts) == tok(texts, add_special_tokens=False).input_ids
