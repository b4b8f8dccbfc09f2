"""The round loop every engine shares: which clients train what, what is kept, when to regroup, evaluate
and checkpoint. An engine only supplies a Transport, the way to reach its clients:

- ``train(jobs, round)``: each named client trains the state it is sent; a reply, or why there is none;
- ``score(selectors, round)``: every client scores every selector on its held-out slice.

The local engine's transport calls SelectorClient in-process; the Flower engine's sends Messages over a Grid.
Both therefore run exactly the decisions below and in Algorithm, with the same seeds.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import RunConfig
from ..models.adapters import AdapterState
from ..runs import RunDir
from ..selector.training import lr_factor
from .algorithm import Algorithm
from .checkpoint import ServerState, save_checkpoint
from .client import ScoreReply, TrainReply, client_seed, round_window
from .privacy import CentralDP
from .server import fedavg, reject_reason
from .server_optimizer import server_step

log = logging.getLogger(__name__)


class TooFewClientsError(RuntimeError):
    pass


def state_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


@dataclass
class TrainJob:
    selector: str
    state: AdapterState
    seed: int
    # "gradient": not a round of training but one plain gradient step of rate 1 over the client's first
    # `pairs` training pairs (grouping: gradients); None: federated.local_steps steps of the run's optimizer
    probe: str | None = None
    pairs: int | None = None


class Transport(Protocol):
    def train(self, jobs: dict[str, TrainJob], round_: int) -> dict[str, TrainReply | str]:
        """Client name -> its reply, or a string saying why there is none (raised, unreachable, ...)."""
        ...

    def score(self, selectors: dict[str, AdapterState], round_: int) -> dict[str, ScoreReply | str]:
        """Every client -> its held-out loss under every selector (with standard errors), or why it could
        not score."""
        ...

    def optimizer_states(self) -> dict[str, dict]:
        """Client optimizer states to checkpoint (only when they persist across rounds)."""
        ...

    def client_sizes(self) -> dict[str, int]:
        """Every client's training pairs (asked only by the paper rule weighted by samples)."""
        ...


Evaluator = Callable[[ServerState, int], dict]


def grouping_trust(losses: dict[str, dict[str, float]], errors: dict[str, dict[str, float]]) -> dict:
    """How much of a grouping the scores decide.

    Per client the margin between its second-best and best selector's mean held-out loss and that margin over
    its standard error (z). And the same on the losses relative to the other clients' (each selector's mean loss
    over the scored clients subtracted first), which is what trust is judged on: a margin every client shares
    (after a warm-up one selector is often better for everybody) separates nobody, and the balanced assignment
    then splits the clients by noise however large the raw margins are (BENCHMARKS.md, session 17: 4 of 4
    clients decided by z 3.3-7.1, the two groups of raters mixed). A client whose relative z is below 2 would as
    likely have landed with another selector on a fresh slice of its data; a grouping where that holds for most
    clients is untrusted."""
    raw, relative = _counts(*_margins(losses, errors)), _counts(*_margins(_relative(losses), errors))
    return {
        **raw,
        **{f"relative_{k}": v for k, v in relative.items()},
        "trusted": bool(relative["z"]) and relative["decided"] >= len(relative["z"]) / 2,
    }


def _counts(margins: dict[str, float], zs: dict[str, float]) -> dict:
    """The logged figures of one set of margins: each client's margin and z (null where infinite), the clients
    decided (z > 2), the medians."""
    return {
        "margins": margins,
        "z": {c: (z if math.isfinite(z) else None) for c, z in zs.items()},
        "decided": sum(z > 2 for z in zs.values()),
        "median_margin": _median(list(margins.values())),
        "median_z": _median([min(z, 1e9) for z in zs.values()]),
    }


def _relative(losses: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each client's losses minus each selector's mean loss over the clients."""
    names = {k for row in losses.values() for k in row}
    mean = {k: statistics.fmean(row[k] for row in losses.values() if k in row) for k in names}
    return {c: {k: v - mean[k] for k, v in row.items()} for c, row in losses.items()}


def _margins(losses: dict[str, dict[str, float]], errors: dict[str, dict[str, float]]) -> tuple[dict, dict]:
    """Per client: second-best minus best loss, and that over its standard error. ``errors[c][k]`` is the
    standard error of the per-pair loss difference between selector k and the client's best by raw loss (0 for
    that one), so for the two selectors ranked here the error is exact when one of them is that best (always
    at K=2) and otherwise bounded above by the sum of the two (the triangle inequality): z is then conservative."""
    margins, zs = {}, {}
    for c, row in losses.items():
        ranked = sorted(row, key=row.get)
        if len(ranked) < 2:
            continue
        best, second = ranked[0], ranked[1]
        margins[c] = row[second] - row[best]
        own = errors.get(c, {})
        se = own.get(second, 0.0) + own.get(best, 0.0)
        zs[c] = margins[c] / se if se > 0 else (math.inf if margins[c] > 0 else 0.0)
    return margins, zs


def _flat_delta(state: AdapterState, reference: AdapterState) -> np.ndarray:
    return torch.cat(
        [(state[k].double() - reference[k].double()).flatten() for k in sorted(reference)]
    ).numpy()


def _median(values: list[float]) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


class RoundLoop:
    def __init__(
        self,
        cfg: RunConfig,
        algorithm: Algorithm,
        run: RunDir,
        transport: Transport,
        evaluator: Evaluator | None = None,
        quiet: bool = False,
        heldout_evaluator: Evaluator | None = None,
    ):
        self.cfg, self.algorithm, self.run, self.transport = cfg, algorithm, run, transport
        self.evaluator, self.quiet = evaluator, quiet
        # agreement on the clients' held-out slices of the training split (eval.heldout_every): what a setting
        # is tuned on, never the evaluation split
        self.heldout_evaluator = heldout_evaluator
        self.dp = CentralDP(cfg.federated.dp) if cfg.federated.dp else None

    # ---------------------------------------------------------------- grouping round
    def regroup(self, state: ServerState, round_: int) -> None:
        start = time.perf_counter()
        if self.cfg.federated.fedbiscuit.grouping in ("updates", "gradients"):
            assignment, record, missing = self._group_by_updates(state, round_)
        else:
            assignment, record, missing = self._group_by_loss(state, round_)
        # Clients that could not take part while others could join the least populated cluster: the grouped
        # ones are balanced, so this keeps every cluster size within one of the others.
        for c in self.algorithm.clients:
            if c not in assignment:
                sizes = Counter(assignment.values())
                assignment[c] = min(
                    self.algorithm.selectors, key=lambda s: (sizes[s], s != state.clusters.get(c))
                )
        # None at the first grouping: there was no cluster to change
        changed = (
            sorted(c for c in assignment if state.clusters.get(c) != assignment[c])
            if state.clusters
            else None
        )
        state.clusters = assignment
        self.run.log(
            {
                "event": "grouping",
                "round": round_,
                "assignment": assignment,
                **record,
                "changed": changed,
                "seconds": time.perf_counter() - start,
                "unscored": missing,
            }
        )
        moved = "no" if changed is None else len(changed)
        if record["trusted"] is None:
            log.info(
                "round %d grouping by update directions: median cosine margin %.3f; %s clients changed cluster",
                round_,
                record["median_margin"],
                moved,
            )
            return
        if record["trusted"]:
            verdict = ""
        elif record["decided"] >= len(record["losses"]) / 2:
            verdict = ": one selector is better for nearly every client, so the balanced split is noise"
        else:
            verdict = ": for most clients the grouping is within noise"
        (log.info if record["trusted"] else log.warning)(
            "round %d grouping: %d of %d clients prefer a selector by more than 2 standard errors, %d relative to "
            "the other clients (median z %.2f, relative %.2f; median margin %.4f)%s; %s clients changed cluster",
            round_,
            record["decided"],
            len(record["losses"]),
            record["relative_decided"],
            record["median_z"],
            record["relative_median_z"],
            record["median_margin"],
            verdict,
            moved,
        )

    def _group_by_loss(self, state: ServerState, round_: int) -> tuple[dict, dict, dict]:
        """Every client scores every selector on its held-out slice; the balanced assignment of least loss."""
        losses, errors, unscored = {}, {}, {}
        for name, reply in self.transport.score(state.selectors, round_).items():
            if isinstance(reply, str):
                unscored[name] = reply
                log.warning("round %d: client %s could not score the selectors: %s", round_, name, reply)
            elif set(reply.losses) != set(state.selectors):
                unscored[name] = "wrong selectors"
            elif all(math.isfinite(v) for v in reply.losses.values()):
                losses[name], errors[name] = reply.losses, reply.diff_se
            else:
                unscored[name] = "non-finite loss"
        if losses:
            assignment = self.algorithm.group(losses, round_)
        elif state.clusters:
            # Nobody could score: the grouping round failed and every client keeps its previous cluster.
            assignment = dict(state.clusters)
        else:
            raise TooFewClientsError(
                f"round {round_}: no client could score the selectors; cannot group clients"
            )
        return assignment, {"losses": losses, "diff_se": errors, **grouping_trust(losses, errors)}, unscored

    def _group_by_updates(self, state: ServerState, round_: int) -> tuple[dict, dict, dict]:
        """Every client trains the selectors' mean for one round's local steps (grouping: updates; its seed
        salted apart from its training seeds) or takes one plain gradient step from it (grouping: gradients) and
        returns the adapter; clients are clustered by the direction of their change."""
        fb = self.cfg.federated.fedbiscuit
        reference = fedavg(list(state.selectors.values()))
        index = {name: i for i, name in enumerate(self.algorithm.clients)}
        probe = "gradient" if fb.grouping == "gradients" else None
        jobs = {
            c: TrainJob(
                "probe",
                reference,
                client_seed(self.cfg.seed, round_, index[c], salt=1),
                probe,
                fb.gradient_pairs,
            )
            for c in self.algorithm.clients
        }
        deltas, failed = {}, {}
        for name, outcome in self.transport.train(jobs, round_).items():
            outcome = self._check(outcome, reference)
            if isinstance(outcome, str):
                failed[name] = outcome
                log.warning("round %d: client %s sent no usable probe update: %s", round_, name, outcome)
            else:
                deltas[name] = _flat_delta(outcome.state, reference)
        if len(deltas) >= len(self.algorithm.selectors):
            moved = {s: _flat_delta(st, reference) for s, st in state.selectors.items()}
            assignment, margins = self.algorithm.group_by_updates(deltas, moved, round_, state.clusters)
        elif state.clusters:
            assignment, margins = dict(state.clusters), {}  # too few probes: everyone keeps their cluster
        else:
            raise TooFewClientsError(
                f"round {round_}: {len(deltas)} clients sent a usable probe update, fewer than the "
                f"{len(self.algorithm.selectors)} clusters; cannot group clients"
            )
        record = {
            "margins": margins,  # cosine to the own cluster's centre minus the best other's
            "median_margin": _median(list(margins.values())),
            "decided": None,
            "median_z": None,
            "trusted": None,  # no standard errors: a direction's noise is not estimated
        }
        return assignment, record, failed

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, state: ServerState, round_: int) -> dict | None:
        # None: e.g. a Flower server without the evaluation split
        return self._timed_report(self.evaluator, "eval", state, round_)

    def evaluate_heldout(self, state: ServerState, round_: int) -> dict | None:
        return self._timed_report(self.heldout_evaluator, "heldout", state, round_)

    def _timed_report(
        self, evaluator: Evaluator | None, event: str, state: ServerState, round_: int
    ) -> dict | None:
        if evaluator is None:
            return None
        start = time.perf_counter()
        report = evaluator(state, round_)
        report["seconds"] = time.perf_counter() - start
        self.run.log({"event": event, "round": round_, **report})
        return report

    # ---------------------------------------------------------------- one round's replies
    def _check(self, outcome: TrainReply | str, reference: AdapterState) -> TrainReply | str:
        timeout = self.cfg.federated.client_timeout_s
        if isinstance(outcome, str):
            return outcome
        seconds = outcome.metrics.get("seconds", 0.0)
        if timeout is not None and seconds > timeout:
            return f"timed out ({seconds:.1f} s > {timeout} s)"
        return reject_reason(outcome, reference) or outcome

    # ---------------------------------------------------------------- the run
    def run_rounds(self, state: ServerState) -> ServerState:
        fed = self.cfg.federated
        bar = tqdm(
            total=fed.rounds,
            initial=state.round,
            desc=f"{fed.algorithm} rounds",
            unit="round",
            disable=self.quiet,
        )
        index = {name: i for i, name in enumerate(self.algorithm.clients)}
        while state.round < fed.rounds:
            r = state.round
            first, total = round_window(fed.rounds, fed.local_steps, r)
            if self.algorithm.regroup_due(r):
                self.regroup(state, r)
            plan = self.algorithm.plan(state, r)
            round_start = time.perf_counter()
            jobs = {
                name: TrainJob(
                    selector, state.selectors[selector], client_seed(self.cfg.seed, r, index[name])
                )
                for name, selector in plan.items()
            }
            outcomes = self.transport.train(jobs, r)
            replies: dict[str, list[TrainReply]] = {s: [] for s in set(plan.values())}
            client_records, rejected = [], {}
            for name, selector in plan.items():
                outcome = self._check(outcomes.get(name, "no reply"), state.selectors[selector])
                if isinstance(outcome, str):
                    rejected[name] = outcome
                    log.warning("round %d: left out client %s: %s", r, name, outcome)
                    continue
                replies[selector].append(outcome)
                client_records.append(
                    {
                        "client": name,
                        "selector": selector,
                        "samples": outcome.num_samples,
                        "upload_bytes": state_bytes(outcome.state),
                        **outcome.metrics,
                    }
                )
            valid = sum(len(g) for g in replies.values())
            if valid < fed.min_clients:
                raise TooFewClientsError(
                    f"round {r}: only {valid} of {len(plan)} clients returned a usable update "
                    f"(federated.min_clients={fed.min_clients}); left out: {rejected}. "
                    "The last checkpoint is intact: fix the cause and rerun with --resume."
                )
            if self.dp:  # central DP: bound each update's influence, then noise the average
                replies = self.dp.clip(replies, state.selectors)
            sizes = self.transport.client_sizes() if self.algorithm.needs_client_sizes(r) else None
            before = dict(state.selectors)  # aggregation replaces a selector's state, never edits it
            self.algorithm.aggregate(state, replies, r, sizes)
            if self.dp:
                self.dp.add_noise(state, replies, self.cfg.seed, r)
            # the server optimizer steps along (noised) aggregate - selector, for each selector updated this round
            for selector, group in replies.items():
                if group:
                    state.selectors[selector], state.server_optimizer[selector] = server_step(
                        fed.server_optimizer,
                        before[selector],
                        state.selectors[selector],
                        state.server_optimizer.get(selector, {}),
                    )
            round_seconds = time.perf_counter() - round_start
            state.round = r + 1
            self.run.log(
                {
                    "event": "round",
                    "round": r,
                    "clients": client_records,
                    "rejected": rejected,
                    "seconds": round_seconds,
                    "client_seconds": sum(c["seconds"] for c in client_records),
                    "cluster_sizes": dict(Counter(state.clusters.values())) if state.clusters else None,
                    "warmup": self.algorithm.warming_up(r),
                    "lr": self.cfg.train.lr
                    * lr_factor(first, total, self.cfg.train),  # its first step's rate
                }
            )
            bar.update(1)
            if client_records:
                bar.set_postfix(loss=f"{sum(c['loss'] for c in client_records) / len(client_records):.4f}")
            if state.round % fed.eval_every == 0 or state.round == fed.rounds:
                self.evaluate(state, state.round)
            every = self.cfg.eval.heldout_every
            if every and (state.round % every == 0 or state.round == fed.rounds):
                self.evaluate_heldout(state, state.round)
            if state.round % fed.checkpoint_every == 0 or state.round == fed.rounds:
                state.optimizer_states = self.transport.optimizer_states()
                save_checkpoint(self.run.checkpoints, state)
        bar.close()
        return state
