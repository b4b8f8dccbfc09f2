"""Tiny randomly initialised decoders (Llama by default) with a small byte-level tokenizer, for fast offline
tests.

The tokenizer is a byte-level BPE whose vocabulary is the 256 byte symbols plus a few merges, so it encodes
any text, " A" and " B" are single tokens as in real tokenizers, and the vocabulary stays ~270 wide.
"""

from __future__ import annotations

import torch

_SPECIALS = ["<pad>", "<s>", "</s>"]
_MERGES = [("Ġ", "A"), ("Ġ", "B"), ("Ċ", "Ċ"), ("Ġ", "t"), ("h", "e"), ("Ġ", "a"), ("i", "n")]


def tiny_tokenizer(add_bos: bool = False):
    """The byte-level tokenizer; with ``add_bos`` it prepends <s> to every text, as Llama-style tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
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
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=1_000_000
    )
    fast.padding_side = "right"
    return fast


# The decoder families of the paper's models and their neighbours, each with what makes it differ from Llama:
# Gemma scales its embeddings by sqrt(hidden); Gemma 2 soft-caps attention and final logits and alternates
# sliding-window and global layers; Gemma 3 alternates them with per-type rotary settings and normalises q/k;
# Qwen2 has q/k/v biases; Mistral a sliding window; Phi-3 fused qkv and gate/up projections. The windows here
# are shorter than test sequences, so a split that ignores them fails its test.
FAMILIES: dict[str, dict] = {
    "llama": {},
    "qwen2": {},
    "mistral": {"sliding_window": 16},
    "gemma": {"head_dim": 16},
    "gemma2": {
        "head_dim": 16,
        "sliding_window": 16,
        "query_pre_attn_scalar": 16,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
    },
    "gemma3_text": {"head_dim": 16, "sliding_window": 16, "query_pre_attn_scalar": 16},
    "phi3": {},
}


def tiny_model(
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    vocab_size: int | None = None,
    family: str = "llama",
    **config,
):
    """(model, tokenizer): a small random decoder of ``family`` (a transformers model type, one of FAMILIES),
    initialised from ``seed`` so tests are reproducible. Built from its config (``config`` overrides entries of
    it): no hub access."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"tiny_model: family {family!r} is not one of {sorted(FAMILIES)}")
    tokenizer = tiny_tokenizer()
    settings = {
        "vocab_size": vocab_size or len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
    }
    config = AutoConfig.for_model(family, **(settings | FAMILIES[family] | config))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval(), tokenizer


def scripted_model(
    vocab_size: int, next_token: dict[int, int | list[int]], eos_token_id=None, hidden: int = 64
):
    """A Llama whose continuation is scripted: after token t it predicts ``next_token[t]`` (a list: each of
    those equally likely, every other token with probability ~0).

    One decoder block whose attention and MLP outputs are zero, so the residual stream is the current token's
    embedding alone (a bigram model). Each scripted token t gets its own embedding axis k, and the output rows
    of next_token[t] read that axis with a large weight; every other logit is 0. ``eos_token_id`` (an id or
    a list, like a real checkpoint's generation config) says where generate() stops by default.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if len(next_token) > hidden:
        raise ValueError(f"{len(next_token)} scripted tokens need hidden >= {len(next_token)}, got {hidden}")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.norm.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        for k, (token, nxt) in enumerate(next_token.items()):
            model.model.embed_tokens.weight[token, k] = 1.0
            for n in nxt if isinstance(nxt, list) else [nxt]:
                model.lm_head.weight[n, k] = 100.0
    model.generation_config.eos_token_id = eos_token_id
    return model.eval()
