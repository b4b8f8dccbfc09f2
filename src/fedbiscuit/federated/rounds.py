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
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tqdm.auto import tqdm

from ..config import RunConfig
from ..models.adapters import AdapterState
from ..runs import RunDir
from .algorithm import Algorithm
from .checkpoint import ServerState, save_checkpoint
from .client import TrainReply, client_seed
from .privacy import CentralDP
from .server import reject_reason

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


class Transport(Protocol):
    def train(self, jobs: dict[str, TrainJob], round_: int) -> dict[str, TrainReply | str]:
        """Client name -> its reply, or a string saying why there is none (raised, unreachable, ...)."""
        ...

    def score(self, selectors: dict[str, AdapterState], round_: int) -> dict[str, dict[str, float] | str]:
        """Every client -> its held-out loss under every selector, or why it could not score."""
        ...

    def optimizer_states(self) -> dict[str, dict]:
        """Client optimizer states to checkpoint (only when they persist across rounds)."""
        ...

    def client_sizes(self) -> dict[str, int]:
        """Every client's training pairs (asked only by the paper rule weighted by samples)."""
        ...


Evaluator = Callable[[ServerState, int], dict]


class RoundLoop:
    def __init__(
        self,
        cfg: RunConfig,
        algorithm: Algorithm,
        run: RunDir,
        transport: Transport,
        evaluator: Evaluator | None = None,
        quiet: bool = False,
    ):
        self.cfg, self.algorithm, self.run, self.transport = cfg, algorithm, run, transport
        self.evaluator, self.quiet = evaluator, quiet
        self.dp = CentralDP(cfg.federated.dp) if cfg.federated.dp else None

    # ---------------------------------------------------------------- grouping round
    def regroup(self, state: ServerState, round_: int) -> None:
        start = time.perf_counter()
        losses, unscored = {}, {}
        for name, row in self.transport.score(state.selectors, round_).items():
            if isinstance(row, str):
                unscored[name] = row
                log.warning("round %d: client %s could not score the selectors: %s", round_, name, row)
            elif all(math.isfinite(v) for v in row.values()) and set(row) == set(state.selectors):
                losses[name] = row
            else:
                unscored[name] = "non-finite loss" if set(row) == set(state.selectors) else "wrong selectors"
        if losses:
            assignment = self.algorithm.group(losses, round_)
        elif state.clusters:
            # Nobody could score: the grouping round failed and every client keeps its previous cluster.
            assignment = dict(state.clusters)
        else:
            raise TooFewClientsError(
                f"round {round_}: no client could score the selectors; cannot group clients"
            )
        # Clients that could not score while others could join the least populated cluster: the scored ones
        # are balanced, so this keeps every cluster size within one of the others.
        for c in self.algorithm.clients:
            if c not in assignment:
                sizes = Counter(assignment.values())
                assignment[c] = min(
                    self.algorithm.selectors, key=lambda s: (sizes[s], s != state.clusters.get(c))
                )
        state.clusters = assignment
        self.run.log(
            {
                "event": "grouping",
                "round": round_,
                "assignment": assignment,
                "losses": losses,
                "seconds": time.perf_counter() - start,
                "unscored": unscored,
            }
        )

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, state: ServerState, round_: int) -> dict | None:
        if self.evaluator is None:
            return None  # e.g. a Flower server without the evaluation split
        start = time.perf_counter()
        report = self.evaluator(state, round_)
        report["seconds"] = time.perf_counter() - start
        self.run.log({"event": "eval", "round": round_, **report})
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
            self.algorithm.aggregate(state, replies, r, sizes)
            if self.dp:
                self.dp.add_noise(state, replies, self.cfg.seed, r)
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
                }
            )
            bar.update(1)
            if client_records:
                bar.set_postfix(loss=f"{sum(c['loss'] for c in client_records) / len(client_records):.4f}")
            if state.round % fed.eval_every == 0 or state.round == fed.rounds:
                self.evaluate(state, state.round)
            if state.round % fed.checkpoint_every == 0 or state.round == fed.rounds:
                state.optimizer_states = self.transport.optimizer_states()
                save_checkpoint(self.run.checkpoints, state)
        bar.close()
        return state
