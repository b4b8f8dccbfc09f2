"""benchmarks/length_baseline.py on clients with planted length preferences: two like the longer answer, one the
shorter, and some pairs of equal length."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "length_baseline.py"
LONG, SHORT = "yes indeed, certainly yes", "no"


def _rows(n: int, split: str) -> list[dict]:
    rows = []
    for c, likes_longer in (("long-a", True), ("long-b", True), ("short", False)):
        for i in range(n):
            chosen, rejected = (LONG, SHORT) if likes_longer else (SHORT, LONG)
            rows.append({"prompt": f"{split} {c} {i}?", "chosen": chosen, "rejected": rejected, "client": c})
        rows.append({"prompt": f"{split} {c} tie?", "chosen": "yes", "rejected": "no!", "client": c})
    return rows


def test_length_rules_learned_on_train_judged_on_test(tmp_path):
    for split, n in (("train", 12), ("test", 6)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(n, split)))
    config = {
        "data": {"source": "generic", "root": str(tmp_path), "columns": {"client": "client"}},
        "model": {"name_or_path": "tiny", "device": "cpu"},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "length.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "c.yaml"), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    tie = 0.5 / 7  # one equal-length pair in each client's 7 test pairs counts half
    per, one = result["rules"]["per subset"], result["rules"]["one direction"]
    assert result["test_pairs"] == 21
    assert {s: r["direction"] for s, r in per.items() if s != "overall"} == {
        "long-a": "longer",
        "long-b": "longer",
        "short": "shorter",
    }
    for s in ("long-a", "long-b", "short"):
        assert per[s]["agreement"] == pytest.approx(6 / 7 + tie)
    assert one["short"]["direction"] == "longer"  # everybody gets the majority's rule
    assert one["short"]["agreement"] == pytest.approx(tie)
    assert one["overall"]["agreement"] == pytest.approx((2 * (6 / 7 + tie) + tie) / 3)
    lo, hi = per["overall"]["ci95"]
    assert lo < per["overall"]["agreement"] < hi
