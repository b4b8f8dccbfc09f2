"""The binary selector: a causal LM + LoRA that answers " A" or " B" for a prompt and two responses."""

from __future__ import annotations

from ..config import SelectorConfig
from .encoding import EncodedPair, PairEncoder
from .prompts import DEFAULT_TEMPLATE, Template, answer_token_ids

__all__ = ["EncodedPair", "PairEncoder", "build_encoder"]


def build_encoder(tokenizer, cfg: SelectorConfig, source: str) -> tuple[PairEncoder, tuple[int, int]]:
    """The pair encoder for this tokenizer and template, and the two answer token ids."""
    name = cfg.template if cfg.template != "auto" else DEFAULT_TEMPLATE[source]
    encoder = PairEncoder(tokenizer, Template.parse(name), cfg.max_length)
    return encoder, answer_token_ids(tokenizer, cfg.answer_a, cfg.answer_b)
