"""The embedded engine: one process, clients simulated in turn on one shared base model.

Clients borrow the model's single work adapter: the server's state for them is copied in, they train, and a
CPU copy comes out. Memory therefore does not grow with the number of clients or selectors beyond their
adapter states (1.8 MB each for SmolLM2). What the engine decides is nothing: the round loop (rounds.py)
runs Algorithm's decisions; this file only supplies the in-process transport and the server's evaluation.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from ..config import RunConfig
from ..models.adapters import AdapterState
from ..runs import RunDir
from .algorithm import Algorithm
from .checkpoint import ServerState
from .client import ScoreReply, SelectorClient, TrainReply, round_window
from .evaluation import evaluate_selectors
from .rounds import RoundLoop, TooFewClientsError, TrainJob, state_bytes

__all__ = ["LocalEngine", "LocalTransport", "TooFewClientsError", "state_bytes"]


class LocalTransport:
    """Clients called in turn in this process; a client that raises is reported, not propagated."""

    def __init__(self, cfg: RunConfig, model, clients: list[SelectorClient], quiet: bool = False):
        self.cfg, self.model, self.quiet = cfg, model, quiet
        self.clients = {c.name: c for c in clients}

    def train(self, jobs: dict[str, TrainJob], round_: int) -> dict[str, TrainReply | str]:
        fed, out = self.cfg.federated, {}
        for name, job in jobs.items():
            try:
                if job.probe == "gradient":
                    out[name] = self.clients[name].gradient_step(
                        self.model, job.state, job.pairs, self.cfg.train.batch_size
                    )
                    continue
                out[name] = self.clients[name].train(
                    self.model,
                    job.state,
                    self.cfg.train,
                    fed.local_steps,
                    job.seed,
                    fed.reset_optimizer,
                    schedule_window=round_window(fed.rounds, fed.local_steps, round_),
                )
            except Exception as err:  # a client's failure must not end the round; the reason is kept
                out[name] = f"raised {type(err).__name__}: {err}"
        return out

    def score(self, selectors: dict[str, AdapterState], round_: int) -> dict[str, ScoreReply | str]:
        fb, out = self.cfg.federated.fedbiscuit, {}
        bar = tqdm(self.clients.values(), desc=f"grouping (round {round_})", disable=self.quiet, leave=False)
        for client in bar:  # every client, not only sampled ones
            try:
                out[client.name] = client.score(
                    self.model, selectors, fb.grouping_pairs, self.cfg.eval.batch_size
                )
            except Exception as err:
                out[client.name] = f"raised {type(err).__name__}: {err}"
        return out

    def optimizer_states(self) -> dict[str, dict]:
        return {n: c.optimizer_state for n, c in self.clients.items() if c.optimizer_state}

    def client_sizes(self) -> dict[str, int]:
        return {n: len(c.train_pairs) for n, c in self.clients.items()}  # what each reply's num_samples says


class LocalEngine(RoundLoop):
    def __init__(
        self,
        cfg: RunConfig,
        model,
        clients: list[SelectorClient],
        algorithm: Algorithm,
        run: RunDir,
        tests: dict,
        quiet: bool = False,
        heldouts: dict | None = None,
    ):
        self.model = model
        self.encoder, self.choice_ids = clients[0].encoder, clients[0].choice_ids  # shared by all clients
        self.tests = (
            tests  # client -> encoded test pairs (simulation-side evaluation of the global selectors)
        )
        # client -> encoded held-out pairs (eval.heldout_every; simulation-side, like the test pairs)
        self.heldouts = heldouts or {}
        super().__init__(
            cfg,
            algorithm,
            run,
            LocalTransport(cfg, model, clients, quiet),
            self._evaluate,
            quiet,
            self._evaluate_heldout if self.heldouts else None,
        )

    def _evaluate(self, state: ServerState, round_: int, tests: dict | None = None) -> dict:
        return evaluate_selectors(
            self.model,
            self.encoder,
            self.choice_ids,
            state.selectors,
            self.tests if tests is None else tests,
            state.clusters,
            self.cfg.eval.batch_size,
            local=self.cfg.federated.algorithm == "local",
            min_client_pairs=self.cfg.eval.min_client_pairs,
        )

    def _evaluate_heldout(self, state: ServerState, round_: int) -> dict:
        return self._evaluate(state, round_, self.heldouts)
