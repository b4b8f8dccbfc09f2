"""One reader per upstream format; each returns (pairs, LoadReport)."""

from __future__ import annotations

from ...config import GenericData, HHRLHFData, SHPData, TLDRData
from ..pairs import Comparison, LoadReport
from . import generic, hh_rlhf, shp, tldr


def load_split(
    cfg: HHRLHFData | TLDRData | SHPData | GenericData, split: str
) -> tuple[list[Comparison], LoadReport]:
    reader = {"hh_rlhf": hh_rlhf, "tldr": tldr, "shp": shp, "generic": generic}[cfg.source]
    return reader.load(cfg, split)
