"""The phase-2 baselines' client (rlhf/baselines.py): FedDPO and federated SFT on the clients' own pairs."""

import pytest
import torch

from fedbiscuit.config import LoraSettings, config_from_dict
from fedbiscuit.data import prepare_data
from fedbiscuit.models.adapters import adapter_state, add_adapter
from fedbiscuit.models.tiny import tiny_model
from fedbiscuit.rlhf import dpo
from fedbiscuit.rlhf.baselines import POLICY, PolicyClient

from .test_phase2 import rlhf_config


def test_a_feddpo_round_that_fails_part_way_leaves_the_kept_optimizer_state_as_it_was(tmp_path, monkeypatch):
    """federated.reset_optimizer=false: a FedDPO client keeps its AdamW state between rounds; a round that
    raises after some steps (a non-finite DPO loss at its third step) leaves that state as the last completed
    round left it (the loaded optimizer would otherwise step the kept tensors in place)."""
    cfg = config_from_dict(rlhf_config(tmp_path, method="feddpo", judge={"kind": "hf"}), "test")
    data = prepare_data(cfg.data)
    model, tok = tiny_model()
    model = add_adapter(model, POLICY, LoraSettings(r=4, alpha=8), seed=0)
    client = PolicyClient(0, next(iter(data.clients.values())), tok, cfg, sft=False)
    state = adapter_state(model, POLICY)
    client.train(model, state, cfg.train, 3, seed=0, reset_optimizer=False)
    kept = {i: {k: v.clone() for k, v in s.items()} for i, s in client.optimizer_state["state"].items()}
    assert kept and all(float(s["exp_avg"].abs().sum()) > 0 for s in kept.values())

    real, calls = dpo.dpo_loss, []

    def fails_at_the_third_step(*a, **kw):
        calls.append(1)
        per_pair, chosen, rejected = real(*a, **kw)
        return (per_pair * float("nan") if len(calls) == 3 else per_pair), chosen, rejected

    monkeypatch.setattr(dpo, "dpo_loss", fails_at_the_third_step)
    with pytest.raises(FloatingPointError, match="DPO loss became nan at step 3"):
        client.train(model, state, cfg.train, 4, seed=1, reset_optimizer=False)
    assert len(calls) == 3  # two optimizer steps were taken before the failure
    for i, s in client.optimizer_state["state"].items():
        for k, v in s.items():
            assert torch.equal(v, kept[i][k]), (i, k)
