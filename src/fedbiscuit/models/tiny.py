"""A tiny randomly initialised Llama with a small byte-level tokenizer, for fast offline tests.

The tokenizer is a byte-level BPE whose vocabulary is the 256 byte symbols plus a few merges, so it encodes
any text, " A" and " B" are single tokens as in real tokenizers, and the vocabulary stays ~270 wide.
"""

from __future__ import annotations

import torch

_SPECIALS = ["<pad>", "<s>", "</s>"]
_MERGES = [("Ġ", "A"), ("Ġ", "B"), ("Ċ", "Ċ"), ("Ġ", "t"), ("h", "e"), ("Ġ", "a"), ("i", "n")]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    for a, b in _MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(_MERGES)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=1_000_000
    )
    fast.padding_side = "right"
    return fast


def tiny_model(seed: int = 0, hidden: int = 64, layers: int = 2, vocab_size: int | None = None):
    """(model, tokenizer): a 2-layer Llama, initialised from ``seed`` so tests are reproducible."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval(), tokenizer
