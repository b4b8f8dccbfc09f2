"""The run folder: resolved config, metrics.jsonl, checkpoints/, run.log."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .config import RunConfig, dump_config


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null says "not defined" (e.g. agreement on zero decided pairs)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class RunDir:
    def __init__(self, cfg: RunConfig):
        self.path = cfg.run_dir
        self.checkpoints = self.path / "checkpoints"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "config.yaml", dump_config(cfg))
        self.metrics_path = self.path / "metrics.jsonl"
        handler = logging.FileHandler(self.path / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("fedbiscuit").addHandler(handler)
        logging.getLogger("fedbiscuit").setLevel(logging.INFO)
        self._handler = handler

    def log(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **_jsonable(record)}
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        logging.getLogger("fedbiscuit").removeHandler(self._handler)
        self._handler.close()
