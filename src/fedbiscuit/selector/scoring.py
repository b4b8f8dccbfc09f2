"""The selector's forward pass: two logits (for " A" and " B") at the answer position, nothing wider.

The straightforward way computes the full-vocabulary logits at every position (49,152 x length x batch floats
for SmolLM2) and then reads two numbers. Here the decoder's hidden state is read at each sequence's last real
token and multiplied by just the two output-embedding rows: the same numbers, a tiny fraction of the work.
"""

from __future__ import annotations

import torch
from torch import nn


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def choice_logits(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, choice_ids: tuple[int, int]
) -> torch.Tensor:
    """[batch, 2] logits of the two answer tokens after each (right-padded) sequence."""
    base = _base(model)
    # The decoder runs with the active LoRA adapter: peft injects it into the decoder's own layers.
    hidden = base.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    return answer_logits(base, hidden, attention_mask, choice_ids)


def answer_logits(
    model, hidden: torch.Tensor, attention_mask: torch.Tensor, choice_ids: tuple[int, int]
) -> torch.Tensor:
    """[batch, 2]: the decoder's final (normed) hidden state at each sequence's last real token times the two
    answer rows of the output layer. Shared by the full and the cached path."""
    base = _base(model)
    head = base.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"the selector reads two rows of the output layer, which must be a plain nn.Linear "
            f"(got {type(head).__name__}); do not put LoRA on lm_head"
        )
    last = attention_mask.sum(dim=1) - 1
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    rows = list(choice_ids)
    logits = h @ head.weight[rows].T
    if head.bias is not None:
        logits = logits + head.bias[rows]
    cap = getattr(base.config, "final_logit_softcapping", None)
    if cap:  # Gemma-2 squashes its logits; the 2-way softmax must see the same numbers
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def full_vocab_choice_logits(model, input_ids, attention_mask, choice_ids) -> torch.Tensor:
    """The straightforward reference: full logits at every position, then pick. For tests and benchmarks."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    last = attention_mask.sum(dim=1) - 1
    logits = out.logits[torch.arange(out.logits.shape[0], device=out.logits.device), last]
    return logits[:, list(choice_ids)].float()
