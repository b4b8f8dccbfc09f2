"""Central DP on adapter updates: clipping bounds each client's move, noise has the promised scale."""

import pytest
import torch

from fedbiscuit.config import CentralDPConfig, ConfigError, config_from_dict
from fedbiscuit.data.synthetic import planted_run_config
from fedbiscuit.federated.checkpoint import ServerState, list_checkpoints, load_checkpoint
from fedbiscuit.federated.client import TrainReply
from fedbiscuit.federated.privacy import CentralDP
from fedbiscuit.pipeline import run_federated


def _state(value: float, n: int = 1000) -> dict:
    return {"a.lora_A.weight": torch.full((n,), value), "a.lora_B.weight": torch.zeros(n)}


def test_updates_are_clipped_to_the_norm_and_small_ones_pass_unchanged():
    dp = CentralDP(CentralDPConfig(clip_norm=1.0, noise_multiplier=0.0))
    ref = _state(0.0)
    big, small = TrainReply(_state(1.0), 5), TrainReply(_state(0.001), 5)  # norms sqrt(1000) and 0.0316
    out = dp.clip({"s": [big, small]}, {"s": ref})["s"]
    norm = torch.cat([v.flatten() for v in out[0].state.values()]).norm()
    assert norm == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(out[1].state["a.lora_A.weight"], small.state["a.lora_A.weight"])


def test_noise_std_is_z_c_over_n_and_replays_from_the_seed():
    dp = CentralDP(CentralDPConfig(clip_norm=2.0, noise_multiplier=0.5))
    members = [TrainReply(_state(0.0, 200_000), 1) for _ in range(4)]
    states = []
    for _ in range(2):
        state = ServerState(0, {"s": _state(0.0, 200_000)})
        dp.add_noise(state, {"s": members}, seed=3, round_=7)
        states.append(state.selectors["s"]["a.lora_A.weight"])
    assert states[0].std().item() == pytest.approx(0.5 * 2.0 / 4, rel=0.01)
    assert torch.equal(states[0], states[1])


def test_a_dp_run_differs_from_a_plain_one_and_the_config_guards_its_assumptions(tmp_path):
    plain = run_federated(config_from_dict(planted_run_config(tmp_path, "plain", rounds=2)), quiet=True)
    noisy = run_federated(
        config_from_dict(
            planted_run_config(tmp_path, "dp", rounds=2, dp={"clip_norm": 0.05, "noise_multiplier": 1.0})
        ),
        quiet=True,
    )
    a, b = (
        load_checkpoint(list_checkpoints(tmp_path / "runs" / n / "checkpoints")[-1]).selectors["selector-0"]
        for n in ("plain", "dp")
    )
    assert plain["rounds"] == noisy["rounds"] == 2
    assert any(not torch.allclose(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="uniform mean"):
        config_from_dict(
            planted_run_config(
                tmp_path, "bad", weighting="samples", dp={"clip_norm": 1.0, "noise_multiplier": 1.0}
            )
        )
