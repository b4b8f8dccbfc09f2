"""Reading rows from local files with their line numbers, and checking fields, so errors can name both."""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..pairs import DataError


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; a bad line is an error naming file and line."""
    seen = False
    try:
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(str(path), f"not valid JSON ({err.msg})", line=lineno) from None
                if not isinstance(row, dict):
                    raise DataError(
                        str(path), f"expected a JSON object, got {type(row).__name__}", line=lineno
                    )
                seen = True
                yield lineno, row
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise DataError(str(path), f"cannot be read: {err}") from None
    if not seen:
        raise DataError(str(path), "the file holds no rows")


def read_csv(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with _open_text(path) as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            raise DataError(str(path), "the file holds no header and no rows")
        seen = False
        for row in reader:
            seen = True
            yield reader.line_num, row
    if not seen:
        raise DataError(str(path), "the file holds no rows")


def read_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataError(str(path), f"not a readable Parquet file: {err}") from None
    if table.num_rows == 0:
        raise DataError(str(path), "the file holds no rows")
    yield from enumerate(table.to_pylist(), start=1)


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    name = path.name.removesuffix(".gz")
    if name.endswith((".jsonl", ".json")):
        return read_jsonl(path)
    if name.endswith(".csv"):
        return read_csv(path)
    if name.endswith(".parquet"):
        return read_parquet(path)
    raise DataError(str(path), "unknown file type (expected .jsonl, .json, .csv or .parquet, optionally .gz)")


def need(row: dict[str, Any], key: str, file: str, line: int, kind: type | tuple[type, ...] = str) -> Any:
    """The value of a required field, or an error naming the file, line and field."""
    if key not in row or row[key] is None:
        raise DataError(file, "missing required field", line=line, field=key)
    value = row[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(
            file, f"expected {want}, got {type(value).__name__} {value!r:.60}", line=line, field=key
        )
    return value


def hub_rows(hub_id: str, split: str, **kwargs: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a Hugging Face hub dataset, numbered from 1; a clear error when the hub cannot be reached."""
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, split=split, **kwargs)
    except Exception as err:
        raise DataError(
            f"hub:{hub_id}",
            f"could not load split {split!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            "Without a network, point data.root (or the FEDBISCUIT_DATA_DIR environment variable) at a local copy.",
        ) from None
    yield from enumerate(ds, start=1)
