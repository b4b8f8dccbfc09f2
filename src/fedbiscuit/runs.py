"""The run folder: resolved config, metrics.jsonl, checkpoints/, run.log."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from .config import RunConfig, dump_config
from .durable import durable_write_text


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# cuBLAS picks its reduction order by workspace; a fixed workspace makes its matrix products repeatable.
CUBLAS_WORKSPACE = ":4096:8"


def configure_determinism(enabled: bool) -> None:
    """``deterministic: true``: deterministic kernels only (an op without one raises), cuDNN autotuning off.

    Must run before CUDA does any work: cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it starts. On CPU the run
    is bit-identical either way."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically and durably (durable.py)."""
    durable_write_text(path, text)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null says "not defined" (e.g. agreement on zero decided pairs)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line torn by a kill mid-write is skipped."""
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


# Settings a resumed run may change: how long it runs and how it copes, not what it computes.
RESUMABLE_CHANGES = {
    "federated.rounds",
    "federated.min_clients",
    "federated.client_timeout_s",
    "federated.eval_every",
    "federated.checkpoint_every",
    "federated.flower.wait_for_nodes_s",
    "federated.flower.reply_timeout_s",
    "federated.flower.rejoin_wait_s",
    "federated.flower.check_transport_mb",
    # where the simulation's actors run, not what they compute
    "federated.flower.simulation.cpus_per_client",
    "federated.flower.simulation.gpus_per_client",
    "federated.flower.simulation.num_cpus",
    "federated.flower.simulation.object_store_mb",
    # what happens after the last round (the unseen and personalised records are redone on resume), not
    # what the rounds compute: a finished run can be personalised afterwards. (eval.min_client_pairs is not
    # here: the seen clients' evaluations logged along the way would keep the old cut.)
    "federated.personalize_steps",
}


def _diff_keys(old, new, prefix=""):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in old.keys() | new.keys():
            yield from _diff_keys(old.get(key), new.get(key), f"{prefix}{key}.")
    elif old != new:
        yield f"{prefix.rstrip('.')} ({old!r} -> {new!r})"


class RunExistsError(RuntimeError):
    pass


class RunDir:
    """Owns runs/<name>/. A fresh run never silently overwrites an earlier one; a resumed run must have the
    same configuration, and its metrics are cut back to what the checkpoint it resumes from had seen."""

    def __init__(self, cfg: RunConfig, resume: bool = False, overwrite: bool = False):
        # every pipeline opens its run folder before it loads a model: the first moment to fix the kernels
        configure_determinism(cfg.deterministic)
        self.path = cfg.run_dir
        self.checkpoints = self.path / "checkpoints"
        self.metrics_path = self.path / "metrics.jsonl"
        config_path = self.path / "config.yaml"
        text = dump_config(cfg)
        if resume:
            if not config_path.is_file():
                raise RunExistsError(f"--resume: no run to resume in {self.path}")
            old, new = yaml.safe_load(config_path.read_text()), yaml.safe_load(text)
            allowed = set(RESUMABLE_CHANGES)
            if (
                cfg.train.schedule != "constant"
            ):  # the decay runs over rounds x local_steps: its length is fixed
                allowed.discard("federated.rounds")
            diff = sorted(d for d in _diff_keys(old, new) if d.split(" (")[0] not in allowed)
            if diff:
                raise RunExistsError(
                    f"--resume: the configuration differs from the run in {self.path}: {', '.join(diff)} "
                    f"(only {', '.join(sorted(RESUMABLE_CHANGES))} may change on resume)"
                )
        elif self.metrics_path.exists() or any(self.checkpoints.glob("*")):
            if not overwrite:
                raise RunExistsError(
                    f"{self.path} already holds a run: pass --resume to continue it, --overwrite to replace it, "
                    "or set name=... for a new one"
                )
            shutil.rmtree(self.checkpoints, ignore_errors=True)
            self.metrics_path.unlink(missing_ok=True)
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        atomic_write_text(config_path, text)
        handler = logging.FileHandler(self.path / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("fedbiscuit").addHandler(handler)
        logging.getLogger("fedbiscuit").setLevel(logging.INFO)
        self._handler = handler

    def truncate_metrics(self, resume_round: int) -> None:
        """Keep what the checkpoint of ``resume_round`` had seen: rounds before it, and the evaluation taken
        at it (evaluations are logged with the number of rounds done). A line torn by a kill is dropped."""

        def seen(record: dict) -> bool:
            r = record.get("round", -1)
            return r < resume_round or (
                record.get("event") == "eval" and r == resume_round and resume_round > 0
            )

        self._keep_records(seen)

    def drop_events(self, events: set[str]) -> None:
        """Drop every record of these event kinds (and any line torn by a kill)."""
        self._keep_records(lambda record: record.get("event") not in events)

    def _keep_records(self, keep) -> None:
        if not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if keep(record):
                kept.append(line)
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def records(self) -> list[dict]:
        return read_records(self.metrics_path)

    def log(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **_jsonable(record)}
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        logging.getLogger("fedbiscuit").removeHandler(self._handler)
        self._handler.close()
