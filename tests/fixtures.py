"""Writers for small files in the exact upstream formats."""

from __future__ import annotations

import gzip
import json
from pathlib import Path


def hh_transcript(turns: list[tuple[str, str]]) -> str:
    return "".join(f"\n\n{role}: {text}" for role, text in turns)


def write_hh(root: Path, subset: str, split: str, rows: list[dict]) -> Path:
    path = root / subset / f"{split}.jsonl.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def hh_row(question: str, good: str, bad: str) -> dict:
    ctx = [("Human", question)]
    return {
        "chosen": hh_transcript([*ctx, ("Assistant", good)]),
        "rejected": hh_transcript([*ctx, ("Assistant", bad)]),
    }


def tldr_row(post: str, a: str, b: str, choice: int, worker: str, split: str = "train", idx: int = 0) -> dict:
    # The field layout of openai/summarize-from-feedback comparison batches (batchN.json lines).
    return {
        "info": {"id": f"t3_{idx}", "post": post, "title": f"title {idx}", "subreddit": "relationships"},
        "summaries": [
            {"text": a, "policy": "sup2", "note": None},
            {"text": b, "policy": "ref", "note": None},
        ],
        "choice": choice,
        "worker": worker,
        "batch": "batch3",
        "split": split,
        "extra": {},
    }


def shp_row(history: str, a: str, b: str, labels: int, domain: str, post_id: str = "p1") -> dict:
    # The field layout of stanfordnlp/SHP (<domain>/<split>.json lines).
    return {
        "post_id": post_id,
        "domain": domain,
        "upvote_ratio": 0.99,
        "history": history,
        "c_root_id_A": "ca",
        "c_root_id_B": "cb",
        "created_at_utc_A": 1,
        "created_at_utc_B": 2,
        "score_A": 10,
        "score_B": 3,
        "human_ref_A": a,
        "human_ref_B": b,
        "labels": labels,
        "seconds_difference": 1.0,
        "score_ratio": 3.3,
    }


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
