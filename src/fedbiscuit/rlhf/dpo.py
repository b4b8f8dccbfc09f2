"""DPO on the policy's LoRA adapter; the reference is the same network with the adapter switched off.

We own the loop rather than run trl's DPOTrainer (benchmarks/phase2_cost.py measures both) for three reasons:
the reference log-probabilities are computed once per pair up front (the reference never changes, so each
step runs one forward pass instead of two); the full-vocabulary logits are computed only at response tokens,
not over the prompt; and texts are tokenised once. The loss is the paper's (sigmoid, on summed
log-probabilities of the response tokens) or IPO (on their average per token, as in Azar et al. and trl), and
is tested against values computed by hand.

A candidate the policy sampled is scored on the very token ids it sampled, stop token included (decoding and
re-tokenising can change them: a leading space, a different split). The policy's forward pass runs without
dropout, like the reference's (trl's disable_dropout): otherwise the log-ratios start as noise, not as zero.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from .. import distributed
from ..config import DPOConfig, GenerationConfig
from .generation import encode_prompts, reply_end_id


@dataclass(slots=True)
class EncodedPreference:
    prompt: list[int]
    chosen: list[int]  # ends with the stop token when the reply ended: the policy learns where to stop too
    rejected: list[int]


@dataclass
class DPOResult:
    steps: int
    loss: float
    reward_accuracy: float
    margin: float
    seconds: float
    history: list[dict] = field(default_factory=list)


def encode_preferences(
    tokenizer,
    pairs,
    gen: GenerationConfig,
    max_response_tokens: int | None = None,
    stops: list[int] | None = None,
) -> list[EncodedPreference]:
    """Prompt (as the policy saw it) and both responses as token ids.

    ``pairs`` are objects with .prompt, .chosen, .rejected (labelled candidates or human pairs). A response
    that carries the ids the policy sampled (.chosen_ids / .rejected_ids) is used as it is; a text (a human
    answer) is tokenised once, cut at the limit, and a complete one ends with the token that ends a reply
    (reply_end_id: the chat template's end of turn among ``stops``, the model's stop tokens)."""
    if not pairs:
        return []
    limit = max_response_tokens or gen.max_new_tokens
    end = reply_end_id(tokenizer, gen.chat_template, stops)
    prompts = encode_prompts(tokenizer, [p.prompt for p in pairs], gen)

    def responses(side: str) -> list[list[int]]:
        sampled = [getattr(p, f"{side}_ids", None) for p in pairs]
        texts = [getattr(p, side) for p, ids in zip(pairs, sampled, strict=True) if ids is None]
        encoded = iter(tokenizer(texts, add_special_tokens=False).input_ids if texts else [])
        out = []
        for p, ids in zip(pairs, sampled, strict=True):
            if ids is not None:
                out.append(list(ids))
                continue
            ids = next(encoded)
            # the end token only where the text really ended: a reply cut at the limit must not teach the
            # policy to stop there
            finished = getattr(p, f"{side}_finished", True) and len(ids) <= limit and end is not None
            out.append(ids + [end] if finished else ids[:limit])
        return out

    return [
        EncodedPreference(pr, c, r)
        for pr, c, r in zip(prompts, responses("chosen"), responses("rejected"), strict=True)
    ]


def response_logps(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> torch.Tensor:
    """Sum of log p(response token | everything before it), per sequence.

    The 49k-wide output layer is applied only at the positions that predict response tokens.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(model.parameters()).device
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, cols, targets = [], [], []
    for i, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        for t in range(len(p), len(s)):  # hidden state at t-1 predicts token t
            rows.append(i)
            cols.append(t - 1)
            targets.append(s[t])
    hidden = base.get_decoder()(
        input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
    ).last_hidden_state
    rows_t = torch.tensor(rows, device=device)
    h = hidden[rows_t, torch.tensor(cols, device=device)]
    token_logp = token_logps(base, h, torch.tensor(targets, device=device))
    return torch.zeros(len(seqs), device=device, dtype=token_logp.dtype).index_add(0, rows_t, token_logp)


CHUNK_ELEMENTS = 1 << 25  # fp32 logits held at once: 128 MB (SmolLM2: 680 tokens; a 256k vocabulary: 128)


def token_logps(base, h: torch.Tensor, targets: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS):
    """log p(target) for each row of hidden states ``h`` [N, d], in fp32.

    The full-vocabulary logits exist a chunk of rows at a time: at 256k columns (Gemma) and hundreds of
    response tokens, all of them in fp32 would be gigabytes, twice over with their log-softmax. With gradients,
    each chunk is recomputed in the backward pass (activation checkpointing) instead of kept.
    """
    head = base.get_output_embeddings()
    cap = getattr(base.config, "final_logit_softcapping", None)

    def part(hc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        logits = head(hc).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.gather(1, tc[:, None]).squeeze(1) - logits.logsumexp(-1)

    rows = max(1, chunk_elements // head.weight.shape[0])
    if h.shape[0] <= rows:
        return part(h, targets)
    chunks = []
    for i in range(0, h.shape[0], rows):
        hc, tc = h[i : i + rows], targets[i : i + rows]
        if torch.is_grad_enabled() and h.requires_grad:
            chunks.append(torch.utils.checkpoint.checkpoint(part, hc, tc, use_reentrant=False))
        else:
            chunks.append(part(hc, tc))
    return torch.cat(chunks)


def pair_logps(model, batch: list[EncodedPreference], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed log-probabilities, both in one forward pass."""
    prompts = [p.prompt for p in batch] * 2
    responses = [p.chosen for p in batch] + [p.rejected for p in batch]
    out = response_logps(model, prompts, responses, pad_id)
    return out[: len(batch)], out[len(batch) :]


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    kind: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen reward, rejected reward); rewards are beta * (policy - reference) log-ratios.

    sigmoid (Rafailov et al.): -log sigmoid(beta * (dc - dr)); IPO (Azar et al.): (dc - dr - 1/(2 beta))^2,
    with dc, dr the policy-minus-reference log-ratios of the chosen and rejected responses. The inputs are
    what the loss is defined on: summed log-probabilities for sigmoid, per-token averages for IPO
    (loss_inputs gives both).
    """
    dc, dr = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if kind == "sigmoid":
        loss = -F.logsigmoid(beta * (dc - dr))
    elif kind == "ipo":
        loss = (dc - dr - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind!r}: use sigmoid or ipo")
    return loss, beta * dc.detach(), beta * dr.detach()


def loss_inputs(kind: str, batch: list[EncodedPreference], *logps: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Summed log-probabilities (policy chosen, policy rejected, reference chosen, reference rejected) as the
    loss ``kind`` wants them. IPO's target margin 1/(2 beta) is in units of the average log-probability per
    token (Azar et al.; trl's loss_type="ipo"): on sums it would ask longer replies for a smaller per-token
    change. Sigmoid DPO uses the sums."""
    if kind != "ipo":
        return logps
    device = logps[0].device
    chosen = torch.tensor([len(p.chosen) for p in batch], device=device, dtype=logps[0].dtype)
    rejected = torch.tensor([len(p.rejected) for p in batch], device=device, dtype=logps[0].dtype)
    pc, pr, rc, rr = logps
    return pc / chosen, pr / rejected, rc / chosen, rr / rejected


@torch.no_grad()
def reference_logps(model, prefs: list[EncodedPreference], pad_id: int, batch_size: int = 8) -> torch.Tensor:
    """[N, 2] (chosen, rejected) log-probabilities under the reference: the base with every adapter disabled."""
    was_training = model.training
    model.eval()
    out = torch.empty(len(prefs), 2)
    try:
        with model.disable_adapter():
            for i in range(0, len(prefs), batch_size):
                c, r = pair_logps(model, prefs[i : i + batch_size], pad_id)
                out[i : i + batch_size, 0], out[i : i + batch_size, 1] = c.cpu(), r.cpu()
    finally:
        model.train(was_training)
    return out


def adapter_parameters(model, adapter: str) -> list[torch.nn.Parameter]:
    params = [p for n, p in model.named_parameters() if f".{adapter}." in n]
    if not params:
        raise ValueError(f"the model has no adapter named {adapter!r}")
    for p in params:
        p.requires_grad_(True)
    return params


def make_dpo_optimizer(model, adapter: str, cfg: DPOConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        adapter_parameters(model, adapter), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
    )


def dpo_steps(cfg: DPOConfig, num_pairs: int) -> int:
    """Optimizer steps for ``cfg.epochs`` epochs of micro-batches (an epoch's last micro-batch may be short)."""
    per_epoch = math.ceil(num_pairs / cfg.batch_size)
    return max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))


def epoch_batches(num: int, batch_size: int, generator: torch.Generator):
    """Endless micro-batches of indices: each epoch a fresh permutation cut into batches, its last one short.

    A batch never spans two epochs, so no pair appears twice in one batch (topping up an epoch's remainder
    from the next permutation could draw the same pair again)."""
    while True:
        order = torch.randperm(num, generator=generator).tolist()
        for i in range(0, num, batch_size):
            yield order[i : i + batch_size]


def train_dpo(
    model,
    adapter: str,
    prefs: list[EncodedPreference],
    ref: torch.Tensor,
    cfg: DPOConfig,
    pad_id: int,
    *,
    seed: int = 0,
    steps: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    progress=None,
    on_log=None,
    sft: bool = False,
) -> DPOResult:
    """Train ``adapter`` on ``prefs`` with DPO (``ref`` from reference_logps), or, with ``sft``, on the
    chosen responses with the usual next-token loss (the federated SFT baseline; ``ref`` unused)."""
    if not prefs:
        raise ValueError("no preference pairs to train on")
    total = steps or dpo_steps(cfg, len(prefs))
    model.set_adapter(adapter)
    optimizer = optimizer or make_dpo_optimizer(model, adapter, cfg)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    batches = epoch_batches(len(prefs), cfg.batch_size, torch.Generator().manual_seed(seed))
    rank, world = distributed.world()
    was_training = model.training
    # DPO runs without dropout (LoRA's or the base's), like the reference pass and trl's disable_dropout: the
    # policy/reference log-ratio then starts at exactly zero instead of as dropout noise. SFT keeps it.
    model.train(sft)
    start, losses, hits, margins, history = time.perf_counter(), [], [], [], []
    window = {"loss": [], "margin": [], "acc": [], "chosen": [], "rejected": []}
    try:
        for step in range(1, total + 1):
            optimizer.zero_grad(set_to_none=True)
            # kept on the device until the step ends: one host sync per optimizer step, not per micro-batch
            step_losses, step_chosen, step_rejected = [], [], []
            for _ in range(cfg.grad_accum):
                whole = next(batches)  # the same on every process (same generator)
                # several processes: each takes every world-th pair of the micro-batch, and its loss is its
                # pairs' sum over the whole micro-batch's size, so the summed gradients are the mean's
                idx = whole[rank::world]
                if not idx:
                    continue
                batch = [prefs[i] for i in idx]
                if sft:
                    logp = response_logps(model, [p.prompt for p in batch], [p.chosen for p in batch], pad_id)
                    per_pair = -(logp / torch.tensor([len(p.chosen) for p in batch], device=logp.device))
                    chosen_r = rejected_r = torch.zeros(len(batch))
                else:
                    pc, pr = pair_logps(model, batch, pad_id)
                    r = ref[idx].to(pc.device)
                    logps = loss_inputs(cfg.loss, batch, pc, pr, r[:, 0], r[:, 1])
                    per_pair, chosen_r, rejected_r = dpo_loss(*logps, cfg.beta, cfg.loss)
                loss = per_pair.sum() / len(whole)
                (loss / cfg.grad_accum).backward()
                step_losses.append(loss.detach())
                step_chosen.append(chosen_r.detach().reshape(-1))
                step_rejected.append(rejected_r.detach().reshape(-1))
            # statistics of exactly the pairs the micro-batches held, however many that was
            if step_losses:
                step_loss = float(torch.stack(step_losses).float().sum().cpu()) / cfg.grad_accum
                chosen_s = torch.cat(step_chosen).float().cpu()
                rejected_s = torch.cat(step_rejected).float().cpu()
            else:  # more processes than pairs in this step's micro-batches: nothing to add here
                step_loss, chosen_s, rejected_s = 0.0, torch.zeros(0), torch.zeros(0)
            if world > 1:
                distributed.sum_gradients(params)
                (step_loss,) = distributed.sum_scalars(step_loss)
                # every process logs the whole step's pairs (in rank order, not the single process's order)
                shares = distributed.all_gather_objects((chosen_s, rejected_s))
                chosen_s = torch.cat([c for c, _ in shares])
                rejected_s = torch.cat([r for _, r in shares])
            margin = chosen_s - rejected_s
            margins += margin.tolist()
            hits += (margin > 0).float().tolist()
            window["margin"] += margin.tolist()
            window["acc"] += (margin > 0).float().tolist()
            window["chosen"] += chosen_s.tolist()
            window["rejected"] += rejected_s.tolist()
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"DPO loss became {step_loss} at step {step}; lower rlhf.dpo.lr")
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            losses.append(step_loss)
            window["loss"].append(step_loss)
            if step % cfg.log_every == 0 or step == total:
                mean = {k: sum(v) / len(v) for k, v in window.items() if v}
                record = {
                    "step": step,
                    "loss": mean["loss"],
                    "reward_margin": mean["margin"],
                    "reward_accuracy": mean["acc"],
                    "chosen_reward": mean["chosen"],
                    "rejected_reward": mean["rejected"],
                }
                history.append(record)
                if on_log is not None:
                    on_log(record)
                window = {k: [] for k in window}
            if progress is not None:
                progress(step, total, step_loss)
    finally:
        model.train(was_training)
    return DPOResult(
        steps=total,
        loss=sum(losses) / len(losses),
        reward_accuracy=sum(hits) / len(hits),
        margin=sum(margins) / len(margins),
        seconds=time.perf_counter() - start,
        history=history,
    )
