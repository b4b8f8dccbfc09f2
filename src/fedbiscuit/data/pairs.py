"""The comparison record every loader produces, and the bookkeeping of what a loader dropped."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field


class DataError(ValueError):
    """Bad input data; the message names the file, the line (when there is one) and the field."""

    def __init__(self, file: str, message: str, line: int | None = None, field: str | None = None):
        where = (
            file + (f", line {line}" if line is not None else "") + (f", field {field!r}" if field else "")
        )
        super().__init__(f"{where}: {message}")
        self.file, self.line, self.field = file, line, field


@dataclass(frozen=True, slots=True)
class Comparison:
    """One human judgment: which of two responses to ``prompt`` people preferred.

    ``label`` is P(response_a is better): 1.0 or 0.0 for a hard label, anything between for a soft one.
    ``client`` is the natural owner (annotator, worker, subset, domain); partitioning may rename it.
    """

    prompt: str
    response_a: str
    response_b: str
    label: float
    client: str
    source: str
    uid: str = ""

    @property
    def hard_label(self) -> int | None:
        """1 if A is preferred, 0 if B is, None for an exact tie."""
        if self.label > 0.5:
            return 1
        if self.label < 0.5:
            return 0
        return None


def prompt_hash(prompt: str) -> int:
    """A stable 64-bit hash of a prompt (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest(), "big")


def unit_hash(prompt: str, salt: str = "") -> float:
    """A stable number in [0, 1) from a prompt: both orders of a pair share their prompt, so they land together."""
    return prompt_hash(salt + prompt) / 2**64


@dataclass
class LoadReport:
    """What a loader kept and dropped, by reason. Nothing is dropped without being counted here."""

    kept: Counter = field(default_factory=Counter)  # client -> pairs kept
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # client left with no training pairs -> its pairs

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n

    def skip_clients(self, skipped: dict[str, int]) -> None:
        """Clients with nothing to train on are left out of the run; counted and named, never silently."""
        if not skipped:
            return
        self.skipped.update(skipped)
        self.drop(SKIPPED_CLIENT_PAIRS, sum(skipped.values()))
        self.notes.append(
            f"skipped {len(skipped)} client(s) with no training pairs (all their pairs fell in the held-out "
            f"slice): {', '.join(sorted(skipped))}"
        )

    def merge(self, other: LoadReport) -> None:
        self.kept.update(other.kept)
        self.dropped.update(other.dropped)
        self.notes.extend(other.notes)
        self.skipped.update(other.skipped)


SKIPPED_CLIENT_PAIRS = "held-out pairs of clients with no training pairs"
