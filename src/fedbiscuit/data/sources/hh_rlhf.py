"""Anthropic HH-RLHF: ``<subset>/{train,test}.jsonl.gz`` rows ``{"chosen", "rejected"}``; clients = subsets."""

from __future__ import annotations

from collections.abc import Iterator

from ...config import HHRLHFData
from ..pairs import Comparison, DataError, LoadReport
from .rows import hub_rows, need, read_jsonl

_TURN = "\n\nAssistant:"


def split_transcript(text: str) -> tuple[str, str] | None:
    """(context up to and including the last 'Assistant:', final answer) or None if there is no such turn."""
    cut = text.rfind(_TURN)
    if cut < 0:
        return None
    return text[: cut + len(_TURN)].strip(), text[cut + len(_TURN) :].strip()


def _rows(cfg: HHRLHFData, subset: str, split: str) -> tuple[str, Iterator]:
    root = cfg.resolved_root()
    if root is None:
        return f"hub:{cfg.hub_id}/{subset}/{split}", hub_rows(cfg.hub_id, split, data_dir=subset)
    base = root / "hh-rlhf" if (root / "hh-rlhf").is_dir() else root
    for name in (f"{split}.jsonl.gz", f"{split}.jsonl"):
        path = base / subset / name
        if path.is_file():
            return str(path), read_jsonl(path)
    raise DataError(
        str(base / subset / f"{split}.jsonl.gz"), f"HH-RLHF subset {subset!r} split {split!r} not found"
    )


def load(cfg: HHRLHFData, split: str) -> tuple[list[Comparison], LoadReport]:
    pairs: list[Comparison] = []
    report = LoadReport()
    for subset in cfg.subsets:
        file, rows = _rows(cfg, subset, split)
        for line, row in rows:
            chosen = split_transcript(need(row, "chosen", file, line))
            rejected = split_transcript(need(row, "rejected", file, line))
            if chosen is None or rejected is None:
                report.drop("no final Assistant turn")
                continue
            (context, good), (other_context, bad) = chosen, rejected
            if context != other_context:
                report.drop("contexts differ")
                continue
            if good == bad:
                report.drop("identical responses")
                continue
            if not good or not bad:
                report.drop("empty response")
                continue
            # Response A is the chosen one; training shows both orders, so the stored order carries no bias.
            pairs.append(Comparison(context, good, bad, 1.0, subset, "hh_rlhf", f"{subset}/{split}/{line}"))
            report.kept[subset] += 1
    return pairs, report
