"""Comparison prompt templates and the answer tokens " A" / " B".

A template holds ``{prompt}``, ``{response_a}`` and ``{response_b}`` in that order and ends where the answer
letter follows. It is split into four literal pieces that are tokenised once; the texts are tokenised once per
pair, and a sequence is the concatenation, so no pair is ever re-tokenised for its second order or for
truncation. Every piece that precedes a text ends in a single newline: byte-level BPEs split "\n\nText"
differently from "\n\n" + "Text", while ":\n" + "Text" tokenises the same either way (a test checks this on
SmolLM2's tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass

TEMPLATES = {
    "summary": (
        "Below is a forum post and two candidate summaries of it.\n\n"
        "Post:\n{prompt}\n\n"
        "Summary A:\n{response_a}\n\n"
        "Summary B:\n{response_b}\n\n"
        "Which summary is better, A or B?\nAnswer:"
    ),
    "dialogue": (
        "Below is a conversation between a human and an AI assistant, and two candidate final replies "
        "from the assistant.\n\n"
        "Conversation:\n{prompt}\n\n"
        "Reply A:\n{response_a}\n\n"
        "Reply B:\n{response_b}\n\n"
        "Which reply is better, A or B?\nAnswer:"
    ),
    "generic": (
        "Below is an instruction and two candidate responses.\n\n"
        "Instruction:\n{prompt}\n\n"
        "Response A:\n{response_a}\n\n"
        "Response B:\n{response_b}\n\n"
        "Which response is better, A or B?\nAnswer:"
    ),
}
# the template each data source uses unless the config names another
DEFAULT_TEMPLATE = {"hh_rlhf": "dialogue", "tldr": "summary", "shp": "dialogue", "generic": "generic"}
_FIELDS = ("{prompt}", "{response_a}", "{response_b}")


class TemplateError(ValueError):
    pass


@dataclass(frozen=True)
class Template:
    pieces: tuple[str, str, str, str]  # before prompt, between prompt and A, between A and B, after B

    @classmethod
    def parse(cls, name_or_text: str) -> Template:
        text = TEMPLATES.get(name_or_text, name_or_text)
        rest, pieces = text, []
        for field in _FIELDS:
            if rest.count(field) != 1:
                known = ", ".join(TEMPLATES)
                raise TemplateError(
                    f"selector.template must be one of {known} or a text with {field} exactly once "
                    f"and {', '.join(_FIELDS)} in that order; got {name_or_text!r:.80}"
                )
            before, rest = rest.split(field)
            pieces.append(before)
        pieces.append(rest)
        return cls(tuple(pieces))

    def render(self, prompt: str, a: str, b: str) -> str:
        p = self.pieces
        return p[0] + prompt + p[1] + a + p[2] + b + p[3]


def answer_token_ids(tokenizer, answer_a: str = " A", answer_b: str = " B") -> tuple[int, int]:
    """Token ids of the two answers; each must be exactly one token of this tokenizer, and they must differ."""
    ids = []
    for text in (answer_a, answer_b):
        toks = tokenizer(text, add_special_tokens=False).input_ids
        if len(toks) != 1:
            raise TemplateError(
                f"answer {text!r} is {len(toks)} tokens for this tokenizer ({toks}); the selector needs one "
                "token per answer: set selector.answer_a / selector.answer_b (e.g. 'A' without the space)"
            )
        ids.append(toks[0])
    if ids[0] == ids[1]:
        raise TemplateError(f"answers {answer_a!r} and {answer_b!r} map to the same token {ids[0]}")
    return ids[0], ids[1]
