"""What a client does in a round: train a selector it was sent, or score selectors on its held-out slice.

A client never sends text or token ids: a TrainReply holds adapter tensors, a sample count and float metrics;
a ScoreReply holds one float loss per selector. Transport is someone else's job (the engines).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from ..config import TrainConfig
from ..data import ClientData
from ..models.adapters import AdapterState, adapter_state, load_adapter_state
from ..selector.encoding import EncodedPair, PairEncoder
from ..selector.training import choice_loss, make_optimizer, train_selector

WORK_ADAPTER = "selector"  # the one adapter slot every client trains in; global states are loaded into it


def load_kept_state(optimizer: torch.optim.Optimizer, kept: dict | None) -> None:
    """Start ``optimizer`` from the state a client kept after its last completed round (federated.reset_optimizer
    =false); nothing kept yet: leave it fresh. A copy: the optimizer steps the tensors it was loaded with in place,
    and a round that fails part-way must leave the kept state as the last completed round left it."""
    if kept is not None:
        optimizer.load_state_dict(copy.deepcopy(kept))


@dataclass
class TrainReply:
    state: AdapterState
    num_samples: int  # the client's training pairs (FedAvg weight)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ScoreReply:
    losses: dict[str, float]  # selector name -> mean choice loss on the held-out slice
    num_pairs: int
    # selector name -> standard error of the per-pair difference between its loss and the client's lowest
    # mean loss (0 for that selector): how far a grouping can trust the client's preference among selectors
    diff_se: dict[str, float] = field(default_factory=dict)


def round_window(rounds: int, local_steps: int, round_: int) -> tuple[int, int]:
    """(first step, all steps) of round ``round_`` on the run's sequence of local steps: where a client's
    learning-rate schedule stands in that round (train.schedule, train.warmup_steps)."""
    return round_ * local_steps, rounds * local_steps


def client_seed(seed: int, round_: int, client_index: int, salt: int = 0) -> int:
    """A seed for one client's work in one round: runs resume and replay exactly without carried RNG state."""
    return (seed * 1_000_003 + round_ * 10_007 + client_index * 101 + salt) % (2**63)


class SelectorClient:
    """One client: its own data, and the shared base model it borrows for its turn."""

    def __init__(self, index: int, data: ClientData, encoder: PairEncoder, choice_ids: tuple[int, int]):
        self.index = index
        self.name = data.name
        self.data = data
        self.encoder = encoder
        self.choice_ids = choice_ids
        self._train: list[EncodedPair] | None = None
        self._scoring: tuple[int | None, list[EncodedPair]] | None = None
        # AdamW state carried across rounds, only with reset_optimizer=False (checkpointed with the server state)
        self.optimizer_state: dict | None = None

    # Token ids are made on first use and kept: compact, and no pair is tokenised twice.
    @property
    def train_pairs(self) -> list[EncodedPair]:
        if self._train is None:
            self._train = self.encoder.encode(self.data.train)
        return self._train

    def scoring_pairs(self, max_pairs: int | None) -> list[EncodedPair]:
        """The (prefix of the) held-out slice selectors are scored on, encoded only that far: on the cached
        path, encoding a pair computes its trunk states, and a grouping round needs only ``max_pairs``."""
        if self._scoring is None or self._scoring[0] != max_pairs:
            raw = self.data.heldout or self.data.train
            self._scoring = (max_pairs, self.encoder.encode(raw[:max_pairs] if max_pairs else raw))
        return self._scoring[1]

    def train(
        self,
        model,
        state: AdapterState,
        cfg: TrainConfig,
        steps: int,
        seed: int,
        reset_optimizer: bool = True,
        pairs: list[EncodedPair] | None = None,
        schedule_window: tuple[int, int] | None = None,
    ) -> TrainReply:
        """``steps`` local steps from ``state`` on the client's training pairs (or on ``pairs``: an unseen
        client personalises on its labelled slice, federated/population.py). ``schedule_window``: where these
        steps sit on the run's learning-rate schedule (round_window); None keeps ``cfg.lr`` constant."""
        pairs = self.train_pairs if pairs is None else pairs
        if not pairs:
            raise ValueError(f"client {self.name!r} has no training pairs")
        load_adapter_state(model, WORK_ADAPTER, state, where=f"state sent to client {self.name}")
        model.set_adapter(WORK_ADAPTER)
        torch.manual_seed(seed)  # LoRA dropout draws from the global generator
        optimizer = make_optimizer(model, cfg)
        if not reset_optimizer:
            load_kept_state(optimizer, self.optimizer_state)
        result = train_selector(
            model,
            self.encoder,
            pairs,
            cfg,
            self.choice_ids,
            seed=seed,
            optimizer=optimizer,
            steps=steps,
            schedule_window=schedule_window,
        )
        if not reset_optimizer:
            self.optimizer_state = optimizer.state_dict()
        return TrainReply(
            state=adapter_state(model, WORK_ADAPTER),
            num_samples=len(pairs),
            metrics={
                "loss": result.loss,
                "accuracy": result.accuracy,
                "pairs_seen": float(result.samples),
                "lr": float(optimizer.param_groups[0]["lr"]),  # the rate of the round's last step
                "seconds": result.seconds,  # pure training: the engine's overhead is the round's time minus this
            },
        )

    def gradient_step(self, model, state: AdapterState, max_pairs: int | None, batch_size: int) -> TrainReply:
        """One plain gradient-descent step of rate 1 from ``state``: ``state`` minus the mean gradient of the
        choice loss over the first ``max_pairs`` training pairs (None: all). What grouping: gradients reads:
        the direction this client's preferences pull a shared selector, without an optimizer's rescaling
        (a fresh AdamW's first steps move every coordinate by about lr, whatever its gradient)."""
        pairs = self.train_pairs[:max_pairs] if max_pairs else self.train_pairs
        if not pairs:
            raise ValueError(f"client {self.name!r} has no training pairs")
        start = time.perf_counter()
        load_adapter_state(model, WORK_ADAPTER, state, where=f"state sent to client {self.name}")
        model.set_adapter(WORK_ADAPTER)
        was_training = model.training
        model.eval()  # no dropout: the direction, not a sample of it
        device = next(model.parameters()).device
        params = {n: w for n, w in model.named_parameters() if w.requires_grad}
        model.zero_grad(set_to_none=True)
        total = 0.0
        try:
            for i in range(0, len(pairs), batch_size):
                batch = pairs[i : i + batch_size]
                logits, target = self.encoder.logits(model, batch, True, self.choice_ids, device)
                loss = choice_loss(logits.float(), target.float()) * (len(batch) / len(pairs))
                loss.backward()
                total += float(loss.detach())
            # peft names a parameter ...lora_A.<adapter>.weight and its state-dict entry ...lora_A.weight
            grads = {n.replace(f".{WORK_ADAPTER}.", "."): w.grad for n, w in params.items()}
            stepped = {}
            for key, value in state.items():
                if key not in grads:
                    raise KeyError(f"no trainable parameter for adapter tensor {key} in client {self.name!r}")
                g = grads[key]
                g = torch.zeros_like(value) if g is None else g.detach().to("cpu", torch.float64)
                stepped[key] = (value.double() - g).to(value.dtype)
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
        return TrainReply(
            state=stepped,
            num_samples=len(pairs),
            metrics={"loss": total, "pairs_seen": float(len(pairs)), "seconds": time.perf_counter() - start},
        )

    @torch.no_grad()
    def score(
        self, model, states: dict[str, AdapterState], max_pairs: int | None, batch_size: int
    ) -> ScoreReply:
        """Mean choice loss of every selector on (a prefix of) the held-out slice, both orders, no gradients."""
        # A small client may have no held-out pair (the slice is drawn by prompt hash): it then scores on its
        # training pairs, which still ranks the selectors for it.
        pairs = self.scoring_pairs(max_pairs)
        pairs = sorted(pairs, key=self.encoder.length)  # similar lengths per batch: little padding
        if not pairs:
            raise ValueError(f"client {self.name!r} has no pairs to score selectors on")
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        per_pair: dict[str, torch.Tensor] = {}
        try:
            for name, state in states.items():
                load_adapter_state(model, WORK_ADAPTER, state, where=f"selector {name}")
                parts = []
                for i in range(0, len(pairs), batch_size):
                    logits, target = self.encoder.logits(
                        model, pairs[i : i + batch_size], True, self.choice_ids, device
                    )
                    seq = choice_loss(logits, target, reduction="none").double().cpu()
                    n = len(seq) // 2  # the pairs as shown, then the same pairs swapped
                    parts.append((seq[:n] + seq[n:]) / 2)
                per_pair[name] = torch.cat(parts)
        finally:
            model.train(was_training)
        losses = {name: float(v.mean()) for name, v in per_pair.items()}
        best = per_pair[min(losses, key=losses.get)]
        diff_se = {name: standard_error(v - best) for name, v in per_pair.items()}
        return ScoreReply(losses=losses, num_pairs=len(pairs), diff_se=diff_se)


def standard_error(values: torch.Tensor) -> float:
    """Standard error of the mean of ``values`` (0 for fewer than two)."""
    n = len(values)
    return float(values.std(unbiased=True) / n**0.5) if n > 1 else 0.0
