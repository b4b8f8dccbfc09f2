"""Runs the pipeline a config names: the top layer, above phase 1 (``pipeline``) and phase 2 (``rlhf``)."""

from __future__ import annotations

import os
import tempfile

from . import distributed
from .config import RunConfig, check_one_order_is_centralized, check_phase2_reads_no_agreement
from .pipeline import run_centralized, run_federated
from .rlhf.phase2 import run_rlhf


def run(cfg: RunConfig, quiet: bool = False, resume: bool = False, overwrite: bool = False) -> dict:
    if distributed.launched():  # one of several processes (accelerate launch): data-parallel training
        n = os.environ["WORLD_SIZE"]
        if cfg.pipeline == "federated":
            raise ValueError(
                f"launched as {n} processes, but a federated run (pipeline: federated) spreads its clients with "
                "its engines (Flower's simulation: federated.flower.simulation.gpus_per_client): start it "
                "without the launcher"
            )
        if cfg.pipeline == "rlhf" and (cfg.rlhf.method != "selectors" or not cfg.rlhf.selectors_from):
            raise ValueError(
                f"launched as {n} processes: phase 2 runs data-parallel on finished selectors "
                f"(rlhf.method: selectors with rlhf.selectors_from set; this config has rlhf.method: "
                f"{cfg.rlhf.method}, rlhf.selectors_from: {cfg.rlhf.selectors_from}). Train the selectors "
                "first (a federated run, without the launcher); the feddpo and fedsft baselines train through "
                "the federated engines and also run without it"
            )
        distributed.join()
        if not distributed.is_main():  # the same training; its files and printout are rank 0's alone
            cfg = cfg.model_copy(update={"output_dir": tempfile.mkdtemp(prefix="fedbiscuit-rank-")})
            quiet, overwrite = True, True
    check_one_order_is_centralized(cfg)
    check_phase2_reads_no_agreement(cfg)
    if cfg.pipeline == "centralized":
        if resume:
            raise ValueError("--resume applies to federated runs (pipeline: federated)")
        return run_centralized(cfg, quiet, overwrite)
    if cfg.pipeline == "federated":
        return run_federated(cfg, quiet, resume, overwrite)
    if cfg.pipeline == "rlhf":
        return run_rlhf(cfg, quiet, resume, overwrite)
    raise ValueError(f"unknown pipeline {cfg.pipeline!r}")
