"""Stanford Human Preferences (SHP): ``<domain>/{train,validation,test}.json`` JSON lines; clients = domains.

``labels == 1`` means ``human_ref_A`` is preferred (the dataset card: "1 if A is preferred to B"). The
reference FedBiscuit code reads it the other way round; a test pins our direction.
"""

from __future__ import annotations

from collections.abc import Iterator

from ...config import SHPData
from ..pairs import Comparison, DataError, LoadReport
from .rows import hub_rows, need, read_rows


def _sources(cfg: SHPData, split: str) -> list[tuple[str, Iterator]]:
    root = cfg.resolved_root()
    if root is None:
        return [(f"hub:{cfg.hub_id}/{split}", hub_rows(cfg.hub_id, split))]
    if (root / "shp").is_dir():
        root = root / "shp"
    domains = cfg.domains or sorted(p.name for p in root.iterdir() if p.is_dir())
    out = []
    for domain in domains:
        files = [p for p in sorted((root / domain).glob(f"{split}.*")) if not p.name.endswith(".md")]
        if not files:
            raise DataError(
                str(root / domain / f"{split}.json"), f"SHP domain {domain!r} has no {split!r} file"
            )
        out.extend((str(p), read_rows(p)) for p in files)
    if not out:
        raise DataError(str(root), "no SHP domain folders found")
    return out


def domain_name(raw: str) -> str:
    """The domain itself: names on the hub carry their split as a suffix ("askculinary_train")."""
    return raw.rsplit("_", 1)[0] if raw.endswith(("_train", "_validation", "_test")) else raw


def load(cfg: SHPData, split: str) -> tuple[list[Comparison], LoadReport]:
    pairs: list[Comparison] = []
    report = LoadReport()
    wanted = set(cfg.domains) if cfg.domains else None
    matched: set[str] = set()
    for file, rows in _sources(cfg, split):
        for line, row in rows:
            # compared after the suffix is stripped, so domains: [askculinary] matches "askculinary_train"
            client = domain_name(need(row, "domain", file, line))
            if wanted is not None and client not in wanted:
                continue
            matched.add(client)
            history = need(row, "history", file, line)
            a = need(row, "human_ref_A", file, line).strip()
            b = need(row, "human_ref_B", file, line).strip()
            label = need(row, "labels", file, line, int)
            if label not in (0, 1):
                raise DataError(file, f"labels must be 0 or 1, got {label}", line=line, field="labels")
            if a == b:
                report.drop("identical responses")
                continue
            pairs.append(
                Comparison(history, a, b, float(label), client, "shp", str(row.get("post_id", line)))
            )
            report.kept[client] += 1
    if wanted is not None and wanted - matched:
        missing = ", ".join(sorted(wanted - matched))
        raise DataError(
            f"SHP {split}", f"data.domains names domains with no {split!r} rows: {missing}", field="domains"
        )
    return pairs, report
