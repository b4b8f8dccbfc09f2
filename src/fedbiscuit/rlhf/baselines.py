"""Phase-2 baselines through the same local engine: FedDPO and federated SFT on the clients' own human pairs.

A PolicyClient has a SelectorClient's shape (train -> TrainReply with adapter tensors, a sample count and
float metrics), so the round loop with the in-process transport and Algorithm("fedbis") sample, check and
average the policy adapter exactly as they do a selector.
"""

from __future__ import annotations

import torch

from ..data import ClientData
from ..federated.client import TrainReply, load_kept_state
from ..models.adapters import AdapterState, adapter_state, load_adapter_state
from .dpo import encode_preferences, make_dpo_optimizer, reference_logps, train_dpo
from .generation import stop_token_ids

POLICY = "policy"  # the policy's adapter slot


class HumanPair:
    """A human comparison as (prompt, chosen, rejected)."""

    __slots__ = ("prompt", "chosen", "rejected")

    def __init__(self, prompt: str, chosen: str, rejected: str):
        self.prompt, self.chosen, self.rejected = prompt, chosen, rejected


def human_pairs(comparisons) -> list[HumanPair]:
    """Hard-labelled pairs only: an exact tie says nothing to DPO."""
    out = []
    for c in comparisons:
        if c.hard_label is None:
            continue
        chosen, rejected = (c.response_a, c.response_b) if c.hard_label == 1 else (c.response_b, c.response_a)
        out.append(HumanPair(c.prompt, chosen, rejected))
    return out


class PolicyClient:
    """One client of FedDPO (``sft=False``) or federated SFT on its preferred responses (``sft=True``)."""

    def __init__(self, index: int, data: ClientData, tokenizer, cfg, sft: bool):
        self.index, self.name, self.data = index, data.name, data
        self.tokenizer, self.cfg, self.sft = tokenizer, cfg, sft
        self.optimizer_state = None
        self._prefs = None
        self._ref = None

    def _prepare(self, model):
        if self._prefs is None:
            rl = self.cfg.rlhf
            self._prefs = encode_preferences(
                self.tokenizer,
                human_pairs(self.data.train),
                rl.generation,
                max_response_tokens=rl.generation.max_new_tokens,
                stops=stop_token_ids(model, self.tokenizer),  # a reply ends as the policy's replies do
            )
            if not self._prefs:
                raise ValueError(f"client {self.name!r} has no hard-labelled training pairs")
        if self._ref is None and not self.sft:
            # the reference is the base model: it never changes, so one pass per client serves every round
            self._ref = reference_logps(model, self._prefs, self._pad_id)
        return self._prefs, self._ref

    @property
    def _pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def train(
        self,
        model,
        state: AdapterState,
        cfg,
        steps: int,
        seed: int,
        reset_optimizer: bool = True,
        schedule_window: tuple[int, int]
        | None = None,  # the selectors' train.schedule; refused by the config
    ):
        prefs, ref = self._prepare(model)
        load_adapter_state(model, POLICY, state, where=f"policy sent to client {self.name}")
        model.set_adapter(POLICY)
        torch.manual_seed(seed)
        optimizer = make_dpo_optimizer(model, POLICY, self.cfg.rlhf.dpo)
        if not reset_optimizer:
            load_kept_state(optimizer, self.optimizer_state)
        result = train_dpo(
            model,
            POLICY,
            prefs,
            ref,
            self.cfg.rlhf.dpo,
            self._pad_id,
            seed=seed,
            steps=steps,
            optimizer=optimizer,
            sft=self.sft,
        )
        if not reset_optimizer:
            self.optimizer_state = optimizer.state_dict()
        return TrainReply(
            state=adapter_state(model, POLICY),
            num_samples=len(prefs),
            metrics={
                "loss": result.loss,
                "accuracy": result.reward_accuracy,
                "margin": result.margin,
                "seconds": result.seconds,
            },
        )

    def score(self, *args, **kwargs):
        raise NotImplementedError("policy baselines have one adapter: use federated.algorithm=fedbis")
