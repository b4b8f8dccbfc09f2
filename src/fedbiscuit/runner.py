"""Runs the pipeline a config names: the top layer, above phase 1 (``pipeline``) and phase 2 (``rlhf``)."""

from __future__ import annotations

from .config import RunConfig
from .pipeline import run_centralized, run_federated
from .rlhf.phase2 import run_rlhf


def run(cfg: RunConfig, quiet: bool = False, resume: bool = False, overwrite: bool = False) -> dict:
    if cfg.pipeline == "centralized":
        if resume:
            raise ValueError("--resume applies to federated runs (pipeline: federated)")
        return run_centralized(cfg, quiet, overwrite)
    if cfg.pipeline == "federated":
        return run_federated(cfg, quiet, resume, overwrite)
    if cfg.pipeline == "rlhf":
        return run_rlhf(cfg, quiet, resume, overwrite)
    raise ValueError(f"unknown pipeline {cfg.pipeline!r}")
