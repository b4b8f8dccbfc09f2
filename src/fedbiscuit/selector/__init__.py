"""The binary selector: a causal LM + LoRA that answers " A" or " B" for a prompt and two responses."""

from __future__ import annotations

from pathlib import Path

from ..config import LoraSettings, SelectorConfig
from .encoding import EncodedPair, PairEncoder
from .prompts import DEFAULT_TEMPLATE, Template, answer_token_ids

__all__ = ["EncodedPair", "PairEncoder", "build_encoder"]


def build_encoder(
    tokenizer,
    cfg: SelectorConfig,
    source: str,
    *,
    model=None,
    lora: LoraSettings | None = None,
    cache_dir: str | Path | None = None,
    quiet: bool = True,
) -> tuple[PairEncoder, tuple[int, int]]:
    """The pair encoder for this tokenizer and template, and the two answer token ids.

    With ``selector.path: cached`` the encoder feeds the model cached trunk states (``selector.trunk``); it then
    needs the model, its LoRA settings (``top_layers``) and the folder the states are kept in.
    """
    name = cfg.template if cfg.template != "auto" else DEFAULT_TEMPLATE[source]
    template = Template.parse(name)
    choice_ids = answer_token_ids(tokenizer, cfg.answer_a, cfg.answer_b)
    if cfg.path == "full":
        return PairEncoder(tokenizer, template, cfg.max_length), choice_ids
    if model is None or lora is None or lora.top_layers is None or cache_dir is None:
        raise ValueError("selector.path=cached needs the model, model.lora.top_layers and a cache folder")
    from .trunk import CachedEncoder

    root = Path(cfg.cache_dir) if cfg.cache_dir else Path(cache_dir)
    encoder = CachedEncoder(tokenizer, template, cfg.max_length, model, lora.top_layers, root, quiet=quiet)
    return encoder, choice_ids
