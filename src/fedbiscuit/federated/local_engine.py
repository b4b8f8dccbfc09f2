"""The embedded engine: one process, clients simulated in turn on one shared base model.

Clients borrow the model's single work adapter: the server's state for them is copied in, they train, and a
CPU copy comes out. Memory therefore does not grow with the number of clients or selectors beyond their
adapter states (1.8 MB each for SmolLM2). What the engine decides is nothing: sampling, grouping and
aggregation come from Algorithm; training and scoring from SelectorClient.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter

from tqdm.auto import tqdm

from ..config import RunConfig
from ..runs import RunDir
from .algorithm import Algorithm
from .checkpoint import ServerState, save_checkpoint
from .client import SelectorClient, TrainReply, client_seed
from .evaluation import evaluate_selectors
from .server import reject_reason

log = logging.getLogger(__name__)


class TooFewClientsError(RuntimeError):
    pass


def state_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class LocalEngine:
    def __init__(
        self,
        cfg: RunConfig,
        model,
        clients: list[SelectorClient],
        algorithm: Algorithm,
        run: RunDir,
        tests: dict,
        quiet: bool = False,
    ):
        self.cfg, self.model, self.algorithm, self.run, self.quiet = cfg, model, algorithm, run, quiet
        self.clients = {c.name: c for c in clients}
        self.encoder, self.choice_ids = clients[0].encoder, clients[0].choice_ids  # shared by all clients
        self.tests = (
            tests  # client -> encoded test pairs (simulation-side evaluation of the global selectors)
        )

    # ---------------------------------------------------------------- one client, fault-contained
    def _train_client(self, name: str, selector: str, state: ServerState, round_: int) -> TrainReply | str:
        fed = self.cfg.federated
        client = self.clients[name]
        seed = client_seed(self.cfg.seed, round_, client.index)
        try:
            reply = client.train(
                self.model,
                state.selectors[selector],
                self.cfg.train,
                fed.local_steps,
                seed,
                fed.reset_optimizer,
            )
        except Exception as err:  # a client's failure must not end the round; the reason is kept
            return f"raised {type(err).__name__}: {err}"
        if fed.client_timeout_s is not None and reply.metrics["seconds"] > fed.client_timeout_s:
            return f"timed out ({reply.metrics['seconds']:.1f} s > {fed.client_timeout_s} s)"
        return reject_reason(reply, state.selectors[selector]) or reply

    # ---------------------------------------------------------------- grouping round
    def regroup(self, state: ServerState, round_: int) -> None:
        fb = self.cfg.federated.fedbiscuit
        losses, unscored, start = {}, {}, time.perf_counter()
        bar = tqdm(self.clients.values(), desc=f"grouping (round {round_})", disable=self.quiet, leave=False)
        for client in bar:  # every client, not only sampled ones
            try:
                row = client.score(
                    self.model, state.selectors, fb.grouping_pairs, self.cfg.eval.batch_size
                ).losses
            except Exception as err:
                unscored[client.name] = f"raised {type(err).__name__}: {err}"
                log.warning("round %d: client %s could not score the selectors: %s", round_, client.name, err)
                continue
            if all(math.isfinite(v) for v in row.values()):
                losses[client.name] = row
            else:
                unscored[client.name] = "non-finite loss"
        if losses:
            assignment = self.algorithm.group(losses, round_)
        elif state.clusters:
            assignment = {}  # nobody could score: everyone keeps a cluster as below
        else:
            raise TooFewClientsError(
                f"round {round_}: no client could score the selectors; cannot group clients"
            )
        # Clients that could not score join the least populated cluster: the scored ones are balanced, so
        # this keeps every cluster size within one of the others.
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
    def evaluate(self, state: ServerState, round_: int) -> dict:
        start = time.perf_counter()
        report = evaluate_selectors(
            self.model,
            self.encoder,
            self.choice_ids,
            state.selectors,
            self.tests,
            state.clusters,
            self.cfg.eval.batch_size,
            local=self.cfg.federated.algorithm == "local",
        )
        report["seconds"] = time.perf_counter() - start
        self.run.log({"event": "eval", "round": round_, **report})
        return report

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
        while state.round < fed.rounds:
            r = state.round
            if self.algorithm.regroup_due(r):
                self.regroup(state, r)
            plan = self.algorithm.plan(state, r)
            round_start = time.perf_counter()
            replies: dict[str, list[TrainReply]] = {s: [] for s in set(plan.values())}
            client_records, rejected = [], {}
            for name, selector in plan.items():
                outcome = self._train_client(name, selector, state, r)
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
            self.algorithm.aggregate(state, replies)
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
                state.optimizer_states = {
                    n: c.optimizer_state for n, c in self.clients.items() if c.optimizer_state
                }
                save_checkpoint(self.run.checkpoints, state)
        bar.close()
        return state
