"""Pairs as token ids, tokenised once; both presentation orders assembled from the same ids.

When a sequence is too long the context loses its oldest tokens first (the end of a dialogue matters most),
and the responses are cut only when they alone do not fit, evenly, so both stay visible. Both are counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from ..data.pairs import Comparison
from .prompts import Template
from .scoring import choice_logits

# Batches are padded to a multiple of this many positions. On a CPU, oneDNN builds and caches a kernel per
# input shape (up to 1,024 of them, each holding its own packed weights): with exact widths every batch is a
# new shape, and the cache grew by ~0.6 MB per pair while building trunk states; with widths rounded up to 32
# it stays flat (BENCHMARKS.md). The extra positions are masked, so the numbers do not change.
PAD_MULTIPLE = 32


def padded_width(lengths) -> int:
    width = max(lengths)
    return -(-width // PAD_MULTIPLE) * PAD_MULTIPLE


@dataclass(slots=True)
class EncodedPair:
    prompt: list[int]
    a: list[int]
    b: list[int]
    label: float  # P(a is better)
    client: str


class PairEncoder:
    def __init__(self, tokenizer, template: Template, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.dummy_prefix = adds_dummy_prefix(tokenizer)
        head = tokenizer(template.pieces[0], add_special_tokens=False).input_ids
        rest = continuation_ids(tokenizer, list(template.pieces[1:]), self.dummy_prefix)
        bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
        self.pieces = (bos + head, rest[0], rest[1], rest[2])
        fixed = sum(len(p) for p in self.pieces)
        if fixed + 2 > max_length:
            raise ValueError(
                f"selector.max_length={max_length} is shorter than the template itself ({fixed} tokens)"
            )
        self.truncated = Counter()

    def encode(self, pairs: list[Comparison], owner: str | None = None) -> list[EncodedPair]:
        """Tokenise every text once (batched, fast tokenizer) and fit each pair into ``max_length``.

        Truncation happens here, once per pair, so it is the same in both orders and counted once.
        ``owner`` names the client the pairs belong to after partitioning (default: their natural id).
        """
        if not pairs:
            return []
        tok = self.tokenizer
        prompts = continuation_ids(tok, [p.prompt for p in pairs], self.dummy_prefix)
        a = continuation_ids(tok, [p.response_a for p in pairs], self.dummy_prefix)
        b = continuation_ids(tok, [p.response_b for p in pairs], self.dummy_prefix)
        return [
            EncodedPair(*self._fit(pr, x, y), p.label, owner or p.client)
            for pr, x, y, p in zip(prompts, a, b, pairs, strict=True)
        ]

    def _fit(self, prompt: list[int], a: list[int], b: list[int]) -> tuple[list[int], list[int], list[int]]:
        room = self.max_length - sum(len(p) for p in self.pieces)
        if len(prompt) + len(a) + len(b) <= room:
            return prompt, a, b
        self.truncated["context"] += 1
        keep = max(0, room - len(a) - len(b))
        prompt = prompt[len(prompt) - keep :] if keep else []
        if len(a) + len(b) > room:
            self.truncated["responses"] += 1
            # each response keeps at least half the room; a short one leaves its unused share to the other
            a_len = min(len(a), max(room // 2, room - len(b)))
            a, b = a[:a_len], b[: room - a_len]
        return prompt, a, b

    def sequence(self, pair: EncodedPair, swap: bool) -> list[int]:
        first, second = (pair.b, pair.a) if swap else (pair.a, pair.b)
        p0, p1, p2, p3 = self.pieces
        return p0 + pair.prompt + p1 + first + p2 + second + p3

    def length(self, pair: EncodedPair) -> int:
        return sum(len(p) for p in self.pieces) + len(pair.prompt) + len(pair.a) + len(pair.b)

    def logits(self, model, pairs: list[EncodedPair], both_orders: bool, choice_ids, device=None):
        """([R, 2] answer logits, [R] targets) for these pairs: the full path runs the whole decoder."""
        ids, mask, target = self.batch(pairs, both_orders, device)
        return choice_logits(model, ids, mask, choice_ids), target

    def batch(self, pairs: list[EncodedPair], both_orders: bool, device=None):
        """(input_ids, attention_mask, target) right-padded; target = P(first shown is better).

        With ``both_orders`` the batch holds every pair as (a, b) and then as (b, a).
        """
        seqs, targets = [], []
        for swap in (False, True) if both_orders else (False,):
            for p in pairs:
                seqs.append(self.sequence(p, swap))
                targets.append(1.0 - p.label if swap else p.label)
        ids, mask = self.pad(seqs, device)
        target = torch.tensor(targets, dtype=torch.float32)
        return ids, mask, target if device is None else target.to(device)

    def pad(self, seqs: list[list[int]], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), right-padded to a multiple of PAD_MULTIPLE."""
        width = padded_width(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        return (ids, mask) if device is None else (ids.to(device), mask.to(device))


# Anchors a text is tokenised after, tried in turn until one does not merge with the text's first characters
_ANCHORS = ("\n", "\u00a7", "|")
_MARKER = "\u2581"  # SentencePiece's word-start marker


def adds_dummy_prefix(tokenizer) -> bool:
    """Whether the tokenizer starts every text with a word-start marker (SentencePiece's "add dummy prefix", as
    in Llama-2): then a text tokenised alone gets a marker it does not have inside a longer text."""
    ids = tokenizer("A", add_special_tokens=False).input_ids
    return bool(ids) and tokenizer.convert_ids_to_tokens(ids[:1])[0].startswith(_MARKER)


def continuation_ids(tokenizer, texts: list[str], dummy_prefix: bool | None = None) -> list[list[int]]:
    """Token ids of texts that follow other text in a sequence, so that concatenating separately tokenised
    pieces gives the ids of the whole text.

    Byte-level BPEs (GPT-2, SmolLM2, Llama-3, Qwen) tokenise a text the same alone or after a newline, and get
    the plain call. SentencePiece tokenizers that add a dummy prefix (Llama-2) would put a stray word-start
    marker at every piece's start; for them each text is tokenised after an anchor whose tokens are then cut
    off (an anchor that merges with the text is skipped for the next). ``dummy_prefix``: the tokenizer's
    ``adds_dummy_prefix``, when the caller knows it already.
    """
    if not (adds_dummy_prefix(tokenizer) if dummy_prefix is None else dummy_prefix):
        return tokenizer(texts, add_special_tokens=False).input_ids
    out: list[list[int] | None] = [None] * len(texts)
    for anchor in _ANCHORS:
        todo = [i for i, ids in enumerate(out) if ids is None]
        if not todo:
            break
        head = tokenizer(anchor, add_special_tokens=False).input_ids
        joined = tokenizer([anchor + texts[i] for i in todo], add_special_tokens=False).input_ids
        for i, ids in zip(todo, joined, strict=True):
            if ids[: len(head)] == head:
                out[i] = ids[len(head) :]
    if any(ids is None for ids in out):
        bad = texts[out.index(None)]
        raise ValueError(
            f"cannot tokenise {bad[:40]!r} as a continuation: every anchor merges with its start"
        )
    return out


def adds_bos(tokenizer) -> bool:
    # Llama-style tokenizers prepend BOS when adding special tokens; SmolLM2's does not. Ask rather than guess.
    if tokenizer.bos_token_id is None:
        return False
    return tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]
