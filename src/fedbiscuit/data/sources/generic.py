"""Any JSONL / CSV / Parquet file of comparisons, mapped onto the record by ``data.columns``.

Two layouts: ``chosen``/``rejected`` (A = chosen, label 1), or ``response_a``/``response_b``/``preference``
with ``data.preference_values`` giving P(A is better) for each value (ties: 0.5, dropped or kept soft).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

from ...config import GenericData
from ..pairs import Comparison, DataError, LoadReport
from .rows import hub_rows, need, read_rows


def _source(cfg: GenericData, split: str) -> tuple[str, Iterator]:
    root = cfg.resolved_root()
    if cfg.files is not None:
        if split not in cfg.files:
            raise DataError(
                "data.files", f"no file configured for split {split!r} (have {sorted(cfg.files)})"
            )
        path = Path(cfg.files[split]).expanduser()
        if not path.is_absolute() and root is not None:
            path = root / path
    elif root is not None:
        path = root / f"{split}.{cfg.format}"
    elif cfg.hub_id:
        return f"hub:{cfg.hub_id}/{split}", hub_rows(cfg.hub_id, split)
    else:
        raise DataError(
            "data", "generic data needs data.root, data.files or data.hub_id (or FEDBISCUIT_DATA_DIR)"
        )
    if not path.is_file():
        raise DataError(str(path), "file not found")
    return str(path), read_rows(path)


def _soft(row: dict, key: str, file: str, line: int) -> float:
    raw = need(row, key, file, line, (int, float, str))
    try:
        value = float(raw)
    except ValueError:
        raise DataError(file, f"expected a probability, got {raw!r}", line=line, field=key) from None
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise DataError(file, f"expected a probability in [0, 1], got {raw!r}", line=line, field=key)
    return value


def load(cfg: GenericData, split: str) -> tuple[list[Comparison], LoadReport]:
    cols = cfg.columns
    pairs: list[Comparison] = []
    report = LoadReport()
    file, rows = _source(cfg, split)
    for line, row in rows:
        prompt = need(row, cols.prompt, file, line).strip()
        if cols.chosen is not None:
            a, b = need(row, cols.chosen, file, line), need(row, cols.rejected, file, line)
            label = 1.0
        else:
            a, b = need(row, cols.response_a, file, line), need(row, cols.response_b, file, line)
            pref = str(need(row, cols.preference, file, line, (str, int, float))).strip()
            if pref not in cfg.preference_values:
                raise DataError(
                    file,
                    f"preference value {pref!r} is not in data.preference_values ({sorted(cfg.preference_values)})",
                    line=line,
                    field=cols.preference,
                )
            label = cfg.preference_values[pref]
        if cols.soft_label is not None:
            label = _soft(row, cols.soft_label, file, line)
        a, b = a.strip(), b.strip()
        client = str(need(row, cols.client, file, line, (str, int))) if cols.client else "all"
        if a == b:
            report.drop("identical responses")
            continue
        if not a or not b:
            report.drop("empty response")
            continue
        if label == 0.5 and cfg.ties == "drop":
            report.drop("tie")
            continue
        pairs.append(Comparison(prompt, a, b, label, client, "generic", f"{Path(file).name}/{line}"))
        report.kept[client] += 1
    return pairs, report
