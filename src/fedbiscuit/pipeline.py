"""Phase 1 and what every stage shares: the workspace, the centralized selector, the federated selectors.

The dispatch from a config to its pipeline lives in ``runner`` (above this module and ``rlhf``), so this
module never imports phase 2 and phase 2 imports it: layers import only downward.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from . import distributed
from .config import RunConfig
from .data import FederatedData, prepare_data
from .federated.client import WORK_ADAPTER as SELECTOR  # one adapter slot, whoever trains in it
from .models.adapters import (
    adapter_state,
    add_adapter,
    load_adapter_state,
    lora_metadata,
    read_adapter,
    save_adapter,
)
from .models.loading import cache_root, load_model
from .runs import RunDir, seed_everything
from .selector import build_encoder
from .selector.metrics import agreement_report, length_rule, pair_correct, paired_comparison
from .selector.training import planned_steps, score_pairs, train_selector

log = logging.getLogger(__name__)


@dataclass
class Workspace:
    """What every stage shares: the config, the data, one base model with its adapters, the pair encoder."""

    cfg: RunConfig
    data: FederatedData
    model: object
    tokenizer: object
    encoder: object
    choice_ids: tuple[int, int]
    quiet: bool = False
    _tests: list | None = None

    def test_pairs(self) -> list:
        """The evaluation split as token ids, owned by their (partitioned) client; tokenised once per run."""
        if self._tests is None:
            tests = self.data.all_test()
            self._tests = [
                p for name, members in tests.items() for p in self.encoder.encode(members, owner=name)
            ]
        return self._tests


def open_workspace(cfg: RunConfig, quiet: bool = False, data: FederatedData | None = None) -> Workspace:
    """``data``: the config's prepared data when the caller already has it (prepare_data is deterministic)."""
    seed_everything(cfg.seed)
    data = data if data is not None else prepare_data(cfg.data, seed=cfg.seed)
    model, tokenizer = load_model(cfg.model, seed=cfg.seed)
    model = add_adapter(model, SELECTOR, cfg.model.lora, seed=cfg.seed)
    encoder, choice_ids = build_encoder(
        tokenizer,
        cfg.selector,
        cfg.data.source,
        model=model,
        lora=cfg.model.lora,
        cache_dir=cache_root(cfg.model) / "trunk",
        quiet=quiet,
    )
    return Workspace(cfg, data, model, tokenizer, encoder, choice_ids, quiet)


def evaluate(ws: Workspace, stage: str, pairs: list | None = None) -> dict:
    """Agreement with the human labels of the evaluation split (or ``pairs``), per client and overall.

    The report's "correct" holds each decided pair's outcome (1, 0, or 0.5) for paired tests between stages.
    """
    pairs = ws.test_pairs() if pairs is None else pairs
    if not pairs:
        raise ValueError("no evaluation pairs: set data.eval_split to a split that has data")
    both = ws.cfg.eval.swap_average
    bar = tqdm(total=len(pairs), desc=f"eval ({stage})", unit="pair", disable=ws.quiet, leave=False)
    start = time.perf_counter()
    p_ab, p_ba = score_pairs(
        ws.model,
        ws.encoder,
        pairs,
        ws.choice_ids,
        ws.cfg.eval.batch_size,
        both_orders=both,
        progress=bar.update,
    )
    bar.close()
    report = agreement_report(pairs, p_ab, p_ba, ws.cfg.eval.min_client_pairs)
    report["seconds"] = time.perf_counter() - start
    report["stage"] = stage
    report["correct"] = pair_correct(pairs, p_ab, p_ba)
    return report


def length_reference(data: FederatedData, tokenizer) -> dict:
    """{"length_rule": ...} on the evaluation split's pairs (the report draws it beside the agreement curve), or
    nothing where a run has no evaluation pairs."""
    tests = [p for pairs in data.all_test().values() for p in pairs]
    if not tests:
        return {}

    def count(text: str) -> int:  # the whole answer, as the selector's tokenizer cuts it
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return {"length_rule": length_rule(tests, count)}


def _logged(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "correct"}


def run_centralized(cfg: RunConfig, quiet: bool = False, overwrite: bool = False) -> dict:
    run = RunDir(cfg, overwrite=overwrite)
    try:
        ws = open_workspace(cfg, quiet)
        run.log(
            {
                "event": "data",
                "clients": {n: len(c.train) for n, c in ws.data.clients.items()},
                "dropped": dict(ws.data.report.dropped),
                "notes": ws.data.report.notes,
                **({"unseen": unseen_sizes(ws.data)} if ws.data.unseen else {}),
                **length_reference(ws.data, ws.tokenizer),
            }
        )
        results = {}
        has_test = bool(cfg.data.eval_split)
        heldout = [p for c in ws.data.clients.values() for p in ws.encoder.encode(c.heldout)]
        curve: list[dict] = []
        if cfg.eval.before_training:
            if has_test:
                results["before"] = evaluate(ws, "before")
                run.log({"event": "eval", **_logged(results["before"])})
            if heldout:
                curve.append(_heldout_point(ws, heldout, 0, 0))
                run.log({"event": "heldout", **curve[-1]})
        train_pairs = ws.encoder.encode(ws.data.all_train())
        total = planned_steps(cfg.train, len(train_pairs))
        bar = tqdm(total=total, desc="train selector", unit="step", disable=quiet)
        every = cfg.eval.heldout_every
        per_step = cfg.train.batch_size * cfg.train.grad_accum

        def progress(step, total, loss):
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(1)
            if every and heldout and step % every == 0 and step < total:
                curve.append(_heldout_point(ws, heldout, step, step * per_step))
                run.log({"event": "heldout", **curve[-1]})

        result = train_selector(
            ws.model,
            ws.encoder,
            train_pairs,
            cfg.train,
            ws.choice_ids,
            seed=cfg.seed,
            progress=progress,
            on_log=lambda h: run.log({"event": "train", **h}),
        )
        bar.close()
        run.log(
            {
                "event": "train_done",
                "steps": result.steps,
                "loss": result.loss,
                "accuracy": result.accuracy,
                "samples": result.samples,
                "seconds": result.seconds,
                "processes": distributed.world()[1],  # data-parallel training under a launcher
                "truncated": dict(ws.encoder.truncated),
                **({"trunk_cache": ws.encoder.stats} if hasattr(ws.encoder, "stats") else {}),
            }
        )
        ckpt = run.checkpoints / f"{SELECTOR}.safetensors"
        save_adapter(adapter_state(ws.model, SELECTOR), ckpt, lora_metadata(cfg.model.lora))
        if heldout:
            curve.append(_heldout_point(ws, heldout, result.steps, result.samples))
            run.log({"event": "heldout", **curve[-1]})
            results["heldout_curve"] = curve
        if has_test:
            results["after"] = evaluate(ws, "after")
            run.log({"event": "eval", **_logged(results["after"])})
            if "before" in results:
                results["paired"] = paired_comparison(
                    results["before"]["correct"], results["after"]["correct"]
                )
                run.log({"event": "paired", **results["paired"]})
        if ws.data.unseen:  # one selector: every unseen client is judged by it, on its remaining pairs
            pairs = [p for n, c in ws.data.unseen.items() for p in ws.encoder.encode(c.test, owner=n)]
            results["unseen"] = {
                "clients": unseen_sizes(ws.data),
                "own": _logged(evaluate(ws, "unseen", pairs)),
            }
            run.log({"event": "unseen", **results["unseen"]})
        results["train"] = {
            "steps": result.steps,
            "seconds": result.seconds,
            "loss": result.loss,
            "accuracy": result.accuracy,
        }
        results["checkpoint"] = str(ckpt)
        results["run_dir"] = str(run.path)
        for stage in ("before", "after"):
            if stage in results:
                results[stage] = _logged(results[stage])
        return results
    finally:
        run.close()


def _heldout_point(ws: Workspace, heldout: list, step: int, pairs_seen: int) -> dict:
    report = evaluate(ws, f"held-out, step {step}", heldout)
    overall = report["overall"]
    return {
        "step": step,
        "pairs_seen": pairs_seen,
        "agreement": overall["agreement"],
        "ci95": overall["ci95"],
        "n": overall["n"],
        "clients": {name: c["agreement"] for name, c in report["clients"].items()},
    }


def evaluate_checkpoint(cfg: RunConfig, checkpoint: str | Path | None, quiet: bool = False) -> dict:
    """Agreement of a saved selector (default: the run's own checkpoint) on the config's evaluation split."""
    ckpt = Path(checkpoint) if checkpoint else cfg.run_dir / "checkpoints" / f"{SELECTOR}.safetensors"
    state, _ = read_adapter(ckpt)
    ws = open_workspace(cfg, quiet)
    load_adapter_state(ws.model, SELECTOR, state, where=str(ckpt))
    report = _logged(evaluate(ws, "checkpoint"))
    report["checkpoint"] = str(ckpt)
    return report


def initial_selectors(model, names: list[str], cfg: RunConfig) -> dict:
    """Distinct initial adapters (selector k from seed + k): FedBiscuit warms its selectors in turn, not copies."""
    states = {}
    for k, name in enumerate(names):
        model = add_adapter(model, "init", cfg.model.lora, seed=cfg.seed + k)
        states[name] = adapter_state(model, "init")
        model.set_adapter(SELECTOR)
        model.delete_adapter("init")
    model.set_adapter(SELECTOR)
    return states


def run_federated(cfg: RunConfig, quiet: bool = False, resume: bool = False, overwrite: bool = False) -> dict:
    run = RunDir(cfg, resume=resume, overwrite=overwrite)
    try:
        ws = open_workspace(cfg, quiet)
        _, summary = train_federated(ws, run, resume)
        return summary
    finally:
        run.close()


def train_federated(ws: Workspace, run: RunDir, resume: bool = False):
    """Phase 1 in ``run``: FedBis / FedBiscuit / a baseline on the local engine. (final ServerState, summary)"""
    from .data import ClientData
    from .federated.algorithm import Algorithm
    from .federated.client import SelectorClient
    from .federated.local_engine import LocalEngine
    from .federated.population import after_training

    cfg, data, quiet = ws.cfg, ws.data, ws.quiet
    # The seen clients train; after the rounds they and the unseen clients are evaluated (population.py). The
    # unseen are numbered after the seen, so their seeds never repeat a seen client's.
    seen = [SelectorClient(i, c, ws.encoder, ws.choice_ids) for i, c in enumerate(data.clients.values())]
    unseen = [
        SelectorClient(len(seen) + j, c, ws.encoder, ws.choice_ids)
        for j, c in enumerate(data.unseen.values())
    ]
    clients = seen
    if cfg.federated.algorithm == "centralized":  # the baseline: one client holding everybody's pairs
        held = [p for c in data.clients.values() for p in c.heldout]
        clients = [SelectorClient(0, ClientData("all", data.all_train(), held), ws.encoder, ws.choice_ids)]
    algorithm = Algorithm(cfg.federated, [c.name for c in clients], cfg.seed)
    tests = {name: ws.encoder.encode(pairs, owner=name) for name, pairs in data.all_test().items()}
    if cfg.federated.algorithm == "local" and not set(tests) & {c.name for c in clients}:
        raise ValueError(
            "the local baseline scores each client's own selector on that client's test pairs, but no "
            "evaluation client matches a training client: use partition.method=natural and set data.eval_split"
        )
    heldouts = None
    if cfg.eval.heldout_every:  # every seen client's held-out slice, by the client's own name (not "all")
        heldouts = {
            c.name: ws.encoder.encode(c.heldout, owner=c.name) for c in data.clients.values() if c.heldout
        }
        if not heldouts:
            raise ValueError(
                f"eval.heldout_every={cfg.eval.heldout_every}: no client has a held-out slice "
                "(set data.heldout_fraction above 0)"
            )
    engine = LocalEngine(cfg, ws.model, clients, algorithm, run, tests, quiet, heldouts)
    state, resumed = start_state(
        cfg,
        run,
        ws.model,
        algorithm,
        resume,
        {
            "clients": {c.name: len(c.data.train) for c in clients},
            "dropped": dict(data.report.dropped),
            "notes": data.report.notes,
            **({"unseen": unseen_sizes(data)} if data.unseen else {}),
            **length_reference(data, ws.tokenizer),
        },
    )
    if resumed:
        for c in clients:
            c.optimizer_state = state.optimizer_states.get(c.name)
    elif cfg.eval.before_training:
        engine.evaluate(state, 0)
        engine.evaluate_heldout(state, 0)
    state = engine.run_rounds(state)
    # logged at the final round: a resumed run (even one that had finished) drops these records and redoes them
    after_training(ws.model, seen, unseen, state.selectors, state.clusters, cfg, state.round, run.log)
    return state, federated_summary(run, state)


def unseen_sizes(data: FederatedData) -> dict[str, dict[str, int]]:
    return {n: {"labelled": len(c.heldout), "remaining": len(c.test)} for n, c in data.unseen.items()}


def start_state(cfg: RunConfig, run: RunDir, model, algorithm, resume: bool, data_event: dict):
    """(state, resumed): the newest checkpoint's state with --resume, else round 0 with fresh selectors.

    Shared by every engine so a run started on one resumes the same way on another.
    """
    from .federated.checkpoint import ServerState, list_checkpoints, load_checkpoint

    checkpoints = list_checkpoints(run.checkpoints)
    if resume and checkpoints:
        state = load_checkpoint(checkpoints[-1])
        run.truncate_metrics(state.round)
        log.info("resumed from %s (round %d)", checkpoints[-1], state.round)
        return state, True
    if resume:
        run.truncate_metrics(-1)  # nothing was checkpointed: start the log afresh
    state = ServerState(0, initial_selectors(model, algorithm.selectors, cfg), algorithm.initial_clusters())
    run.log({"event": "data", "round": -1, **data_event})
    return state, False


POPULATIONS = ("unseen", "personalized")  # the records population.after_training writes, if any


def federated_summary(run: RunDir, state) -> dict:
    records = run.records()  # the whole run, also the part before a resume
    evals = [r for r in records if r["event"] == "eval" and "round" in r]
    faults = Counter(
        reason.split(":")[0].split(" (")[0]
        for r in records
        if r["event"] == "round"
        for reason in r["rejected"].values()
    )
    last = {kind: next((r for r in reversed(records) if r["event"] == kind), None) for kind in POPULATIONS}
    paired = None
    if len(evals) > 1 and evals[0]["round"] == 0:
        paired = trained_against_untrained(evals[0], evals[-1])
    return {
        "run_dir": str(run.path),
        "rounds": state.round,
        "clusters": state.clusters,
        "faults": dict(faults),
        "final": evals[-1] if evals else None,
        "first": evals[0] if evals else None,
        "paired": paired,
        **last,
    }


def trained_against_untrained(untrained: dict, final: dict) -> dict | None:
    """The paired test of a federated run: its headline selector(s) at the end (each client's own cluster's, else
    the vote, else the one selector) against the untrained selectors of round 0, on the same test pairs. The
    untrained selectors are all the base model (LoRA starts as a no-op), so the first of them is the untrained
    one; not their vote, whose hard votes turn a position-biased selector's every pair into a tie."""
    from .report import headline_report
    from .selector.metrics import paired_outcomes

    start, end = headline_report(untrained), headline_report(final)  # round 0's is the untrained selector
    if not (start and end and "outcomes" in start[1] and "outcomes" in end[1]):
        return None  # a local baseline, or an evaluation logged before outcomes were kept
    paired = paired_outcomes(start[1]["outcomes"], end[1]["outcomes"])
    return {**paired, "measured_by": end[0]} if paired else None
