"""Local training of a binary selector: 2-way cross-entropy over the answer logits, every pair in both orders."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import distributed
from ..config import TrainConfig
from .encoding import EncodedPair, PairEncoder


@dataclass
class TrainResult:
    steps: int
    loss: float  # mean over the optimizer steps
    accuracy: float  # over all sequences seen (both orders), ties excluded
    samples: int  # pairs seen (each counted once, though shown twice)
    seconds: float
    history: list[dict] = field(default_factory=list)


def choice_loss(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy against P(first shown is better); soft targets allowed. ``reduction="none"``: per row."""
    logp = F.log_softmax(logits, dim=-1)
    loss = -(target * logp[:, 0] + (1.0 - target) * logp[:, 1])
    return loss.mean() if reduction == "mean" else loss


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: add a LoRA adapter and make it active first")
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """The multiple of ``cfg.lr`` at optimizer step ``step`` (0-based) of ``total``.

    transformers' ``constant_with_warmup``, ``linear`` and ``cosine`` schedules (a test checks them against
    ``get_scheduler``), with linear and cosine decaying to ``cfg.min_lr_ratio`` instead of 0. Written out
    rather than taken from a LambdaLR because a federated client needs the rate at an arbitrary step of the
    whole run (its round's steps) without a scheduler object that lives across rounds.
    """
    warmup = cfg.warmup_steps
    if step < warmup:
        return step / max(1, warmup)
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * max(0.0, decay)


def scheduled(cfg: TrainConfig) -> bool:
    return cfg.schedule != "constant" or cfg.warmup_steps > 0


def planned_steps(cfg: TrainConfig, num_pairs: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    per_step = cfg.batch_size * cfg.grad_accum
    return max(1, math.ceil(cfg.epochs * num_pairs / per_step))


def _batches(lengths: list[int], batch_size: int, generator: torch.Generator, group_by_length: bool = True):
    """Endless shuffled micro-batches of indices; a new permutation per epoch, reproducible from the generator.

    With ``group_by_length`` each window of 50 batches is sorted by length before it is cut, and the batches of
    an epoch are then shuffled: neighbours in a batch have similar lengths, so little of a batch is padding,
    while every pair is still seen once per epoch in a random order of batches.
    """
    num = len(lengths)
    while True:
        order = torch.randperm(num, generator=generator).tolist()
        if not group_by_length:
            yield from (order[i : i + batch_size] for i in range(0, num, batch_size))
            continue
        window = 50 * batch_size
        batches = []
        for w in range(0, num, window):
            chunk = sorted(order[w : w + window], key=lambda i: lengths[i])
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        for j in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[j]


def train_selector(
    model,
    encoder: PairEncoder,
    pairs: list[EncodedPair],
    cfg: TrainConfig,
    choice_ids: tuple[int, int],
    *,
    seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    steps: int | None = None,
    schedule_window: tuple[int, int] | None = None,
    progress=None,
    on_log=None,
) -> TrainResult:
    """Train the active adapter for ``steps`` (default: from the config) optimizer steps.

    The learning rate follows ``cfg``'s schedule (lr_factor) over these steps, or, with ``schedule_window =
    (first, total)``, over steps first ... first + steps - 1 of a longer sequence of ``total`` (a federated
    client's round within the run); ``schedule_window=None`` with a caller's optimizer keeps its rate constant
    (the personalisation baseline's few steps).
    ``progress`` is called as progress(step, total, loss) after each step (the CLI hangs a progress bar on it);
    ``on_log`` with each history record as it is made, every ``log_every`` steps.
    """
    if not pairs:
        raise ValueError("no training pairs")
    total = steps if steps is not None else planned_steps(cfg, len(pairs))
    if optimizer is None:
        optimizer = make_optimizer(model, cfg)
        schedule_window = schedule_window or (0, total)
    first, horizon = schedule_window or (0, 0)
    use_schedule = schedule_window is not None and scheduled(cfg)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    device = next(model.parameters()).device
    rank, world = distributed.world()  # several processes: each computes its share of every batch
    generator = torch.Generator().manual_seed(seed)
    batches = _batches([encoder.length(p) for p in pairs], cfg.batch_size, generator, cfg.group_by_length)
    was_training = model.training
    model.train()
    start = time.perf_counter()
    losses, correct, counted, seen, history = [], 0, 0, 0, []
    # Pair-level agreement (both orders averaged) on each batch before the model steps on it: in the first
    # epoch every pair is unseen, so this is a progressive validation curve at no extra cost.
    pair_hits: list[float] = []
    try:
        for step in range(1, total + 1):
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for _ in range(cfg.grad_accum):
                idx = next(batches)  # the same on every process (same generator)
                rows = 2 * len(idx)  # the whole batch's rows, both orders: the loss is their mean
                seen += len(idx)
                idx = idx[rank::world]
                if not idx:  # more processes than pairs in this batch: nothing to add here
                    continue
                logits, target = encoder.logits(model, [pairs[i] for i in idx], True, choice_ids, device)
                loss = choice_loss(logits, target, reduction="none").sum() / rows
                (loss / cfg.grad_accum).backward()
                step_loss += loss.item() / cfg.grad_accum
                with torch.no_grad():
                    decided = target != 0.5
                    pred = logits[:, 0] > logits[:, 1]
                    correct += int((pred == (target > 0.5))[decided].sum())
                    counted += int(decided.sum())
                    n = len(idx)
                    margin = (logits[:n, 0] - logits[:n, 1]) - (logits[n:, 0] - logits[n:, 1])
                    label = target[:n]
                    hit = torch.where(margin == 0, 0.5, ((margin > 0) == (label > 0.5)).float())
                    pair_hits.extend(hit[label != 0.5].tolist())  # this process's share only
            if world > 1:
                distributed.sum_gradients(params)
                (step_loss,) = distributed.sum_scalars(step_loss)
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"selector loss became {step_loss} at step {step}; lower train.lr")
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if use_schedule:
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * lr_factor(first + step - 1, horizon, cfg)
            optimizer.step()
            losses.append(step_loss)
            if step % cfg.log_every == 0 or step == total:
                window = losses[-cfg.log_every :]
                hits = pair_hits[-cfg.log_every * cfg.batch_size * cfg.grad_accum :]
                history.append(
                    {
                        "step": step,
                        "loss": sum(window) / len(window),
                        "pair_agreement": sum(hits) / len(hits) if hits else float("nan"),
                        "lr": optimizer.param_groups[0]["lr"],
                        "pairs_seen": seen,
                    }
                )
                if on_log is not None:
                    on_log(history[-1])
            if progress is not None:
                progress(step, total, step_loss)
    finally:
        model.train(was_training)
    return TrainResult(
        steps=total,
        loss=sum(losses) / len(losses),
        accuracy=correct / counted if counted else float("nan"),
        samples=seen,
        seconds=time.perf_counter() - start,
        history=history,
    )


@torch.no_grad()
def score_pairs(
    model,
    encoder: PairEncoder,
    pairs: list[EncodedPair],
    choice_ids: tuple[int, int],
    batch_size: int = 16,
    both_orders: bool = True,
    progress=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """P(a better) as shown (a, b), and, with ``both_orders``, P(b better) as shown (b, a), per pair.

    Pairs are scored in order of length so batches carry little padding; results come back in input order.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: encoder.length(pairs[i]))
    p_ab = torch.empty(len(pairs))
    p_ba = torch.empty(len(pairs)) if both_orders else None
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            logits, _ = encoder.logits(model, [pairs[i] for i in idx], both_orders, choice_ids, device)
            prob_first = torch.softmax(logits, dim=-1)[:, 0].cpu()
            p_ab[idx] = prob_first[: len(idx)]
            if both_orders:
                p_ba[idx] = prob_first[len(idx) :]
            if progress is not None:
                progress(len(idx))
    finally:
        model.train(was_training)
    return p_ab, p_ba
