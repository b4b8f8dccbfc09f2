"""OpenAI summarize-from-feedback comparisons (TL;DR); clients = ``worker``.

Two layouts: the original comparison batches (JSON lines with ``info.{post,title,subreddit}``,
``summaries[i].text``, ``choice``, ``worker``, ``split``) under ``<root>/comparisons/*.json``, and the hub
parquet layout of ``openai/summarize_from_feedback`` (config ``comparisons``, same fields).
"""

from __future__ import annotations

from pathlib import Path

from ...config import TLDRData
from ..pairs import Comparison, DataError, LoadReport
from .rows import hub_rows, need, read_rows


def format_post(info: dict) -> str | None:
    post = info.get("post") or info.get("article")
    if not post:
        return None
    parts = []
    if info.get("subreddit"):
        parts.append(f"SUBREDDIT: r/{info['subreddit']}")
    if info.get("title"):
        parts.append(f"TITLE: {info['title']}")
    parts.append(f"POST: {post.strip()}")
    return "\n".join(parts)


# Rows say train / valid1 / valid2 (in the batch files and on the hub alike); the hub's files are train and
# validation, the latter holding both valid1 and valid2. As in the reference, valid1 is the validation split
# and valid2 the test split: the two never share a row.
_ROW_SPLIT = {"validation": "valid1", "valid": "valid1", "test": "valid2"}


def row_split(wanted: str) -> str:
    """The value of a row's ``split`` field that belongs to the configured split."""
    return _ROW_SPLIT.get(wanted, wanted)


def hub_split(wanted: str) -> str:
    """The hub split (and hub file prefix) that holds the configured split's rows."""
    return "validation" if row_split(wanted).startswith("valid") else wanted


def _files(root: Path) -> list[Path]:
    base = root / "comparisons" if (root / "comparisons").is_dir() else root
    found = sorted(p for p in base.iterdir() if p.name.endswith((".json", ".jsonl", ".parquet", ".json.gz")))
    if not found:
        raise DataError(str(base), "no TL;DR comparison files (*.json, *.jsonl, *.parquet) in this folder")
    return found


def load(cfg: TLDRData, split: str) -> tuple[list[Comparison], LoadReport]:
    pairs: list[Comparison] = []
    report = LoadReport()
    root = cfg.resolved_root()
    if root is None:
        hub = hub_split(split)
        sources = [(f"hub:{cfg.hub_id}/{hub}", hub_rows(cfg.hub_id, hub, name="comparisons"))]
    else:
        if (root / "tldr").is_dir():
            root = root / "tldr"
        # Hub parquet files are one hub split each ("validation-00000-of-00001.parquet"): read only the one
        # holding this split's rows. Batch files mix splits. Rows are filtered by their `split` field below.
        files = [
            p for p in _files(root) if p.suffix != ".parquet" or p.name.split("-")[0] == hub_split(split)
        ]
        if not files:
            raise DataError(str(root), f"no TL;DR file for split {split!r} in this folder")
        sources = [(str(p), read_rows(p)) for p in files]
    for file, rows in sources:
        for line, row in rows:
            if row.get("split") is not None:
                if need(row, "split", file, line) != row_split(split):
                    continue
            elif hub_split(split) != split:
                # a validation file's row without its own split cannot be told valid1 from valid2
                raise DataError(
                    file,
                    f"no split field: cannot tell whether the row is {split!r}",
                    line=line,
                    field="split",
                )
            info = need(row, "info", file, line, dict)
            summaries = need(row, "summaries", file, line, list)
            choice = need(row, "choice", file, line, int)
            worker = str(need(row, "worker", file, line, (str, int)))
            if len(summaries) != 2 or not all(
                isinstance(s, dict) and isinstance(s.get("text"), str) for s in summaries
            ):
                raise DataError(
                    file, "expected two summaries with a 'text' each", line=line, field="summaries"
                )
            if choice not in (0, 1):
                raise DataError(file, f"choice must be 0 or 1, got {choice}", line=line, field="choice")
            post = format_post(info)
            if post is None:
                report.drop("no post text")
                continue
            a, b = summaries[0]["text"].strip(), summaries[1]["text"].strip()
            if a == b:
                report.drop("identical responses")
                continue
            uid = f"{info.get('id', '')}/{line}"
            pairs.append(Comparison(post, a, b, 1.0 if choice == 0 else 0.0, worker, "tldr", uid))
            report.kept[worker] += 1
    return pairs, report
