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


def _split_matches(row_split: str, wanted: str) -> bool:
    # The batch files say train / valid1 / valid2; the hub says train / validation.
    if wanted in ("validation", "valid", "test"):
        return row_split.startswith("valid")
    return row_split == wanted


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
        sources = [(f"hub:{cfg.hub_id}/{split}", hub_rows(cfg.hub_id, split, name="comparisons"))]
    else:
        if (root / "tldr").is_dir():
            root = root / "tldr"
        # Hub parquet files are one split each ("train-00000-of-00001.parquet"): read only this split's.
        # Batch files mix splits; rows are filtered by their own `split` field below.
        files = [
            p for p in _files(root) if p.suffix != ".parquet" or _split_matches(p.name.split("-")[0], split)
        ]
        if not files:
            raise DataError(str(root), f"no TL;DR file for split {split!r} in this folder")
        sources = [(str(p), read_rows(p)) for p in files]
    for file, rows in sources:
        for line, row in rows:
            if row.get("split") is not None and not _split_matches(need(row, "split", file, line), split):
                continue
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
