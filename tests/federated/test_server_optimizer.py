"""Server optimizers (FedAvg, FedAvgM, FedAdam, FedYogi) on one-tensor adapters: the update rules by hand."""

import math

import pytest
import torch

from fedbiscuit.config import ConfigError, ServerOptimizerConfig, config_from_dict
from fedbiscuit.federated.algorithm import Algorithm
from fedbiscuit.federated.checkpoint import ServerState, list_checkpoints, load_checkpoint, save_checkpoint
from fedbiscuit.federated.client import TrainReply
from fedbiscuit.federated.rounds import RoundLoop
from fedbiscuit.federated.server_optimizer import server_step
from fedbiscuit.runs import RunDir


def _x(*values):
    return {"w": torch.tensor(values, dtype=torch.float32)}


def test_plain_fedavg_takes_the_aggregate_as_it_is():
    target = _x(0.3, -0.7)
    out, state = server_step(ServerOptimizerConfig(), _x(1.0, 1.0), target, {})
    assert out is target and state == {}


def test_avg_with_a_server_rate_scales_the_mean_change():
    out, _ = server_step(ServerOptimizerConfig(name="avg", lr=2.0), _x(1.0), _x(1.5), {})
    assert out["w"].item() == pytest.approx(2.0)


def test_avgm_accumulates_momentum_across_rounds():
    cfg = ServerOptimizerConfig(name="avgm", lr=1.0, momentum=0.5)
    x, state = _x(0.0), {}
    x, state = server_step(cfg, x, _x(1.0), state)  # d = 1, m = 1, x = 1
    assert x["w"].item() == pytest.approx(1.0) and int(state["step"]) == 1
    x, state = server_step(cfg, x, _x(2.0), state)  # d = 1, m = 0.5 + 1 = 1.5, x = 2.5
    assert x["w"].item() == pytest.approx(2.5) and state["m.w"].item() == pytest.approx(1.5)
    x, state = server_step(cfg, x, _x(2.5), state)  # d = 0: momentum alone moves it by 0.75
    assert x["w"].item() == pytest.approx(3.25)


@pytest.mark.parametrize("name", ["adam", "yogi"])
def test_adaptive_rules_match_the_formulas(name):
    b1, b2, tau, lr = 0.9, 0.99, 1e-3, 0.1
    cfg = ServerOptimizerConfig(name=name, lr=lr, betas=(b1, b2), tau=tau)
    x, state = _x(0.0, 0.0), {}
    deltas = [(0.02, -0.5), (0.01, 0.3), (-0.04, 0.0)]
    m = [0.0, 0.0]
    v = [0.0, 0.0]
    expected = [0.0, 0.0]
    for t, d in enumerate(deltas, start=1):
        target = {"w": x["w"] + torch.tensor(d, dtype=torch.float32)}
        d = (target["w"].double() - x["w"].double()).tolist()  # the float32 difference the server sees
        x, state = server_step(cfg, x, target, state)
        for i in range(2):
            m[i] = b1 * m[i] + (1 - b1) * d[i]
            if name == "adam":
                v[i] = b2 * v[i] + (1 - b2) * d[i] ** 2
                scale = math.sqrt(1 - b2**t) / (1 - b1**t)
            else:
                v[i] = v[i] - (1 - b2) * d[i] ** 2 * math.copysign(1.0, v[i] - d[i] ** 2) * (
                    v[i] != d[i] ** 2
                )
                scale = 1.0
            expected[i] = float(
                torch.tensor(expected[i] + lr * scale * m[i] / (math.sqrt(v[i]) + tau)).float()
            )
        assert x["w"].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7), t
        assert int(state["step"]) == t
    # adam's first step is about lr * sign(d) wherever |d| >> tau: the server's rate is a distance
    first, _ = server_step(cfg, _x(0.0), _x(0.5), {})
    assert first["w"].item() == pytest.approx(lr, rel=0.05)


def test_server_optimizer_config_names_the_key_it_cannot_use():
    assert ServerOptimizerConfig.model_validate("avgm").lr == 1.0  # federated.server_optimizer=avgm
    fed = {"pipeline": "federated"}

    def refused(server, match):
        with pytest.raises(ConfigError, match=match):
            config_from_dict({**fed, "federated": {"server_optimizer": server}})

    refused(
        {"name": "adam", "lr": 0.01, "momentum": 0.5}, r"server_optimizer.momentum does nothing with .*'adam'"
    )
    refused({"name": "avgm", "tau": 0.1}, r"server_optimizer.tau does nothing")
    refused("sgd", r"federated.server_optimizer.name")
    refused({"name": "adam", "lr": 0}, r"server_optimizer.lr")
    # adam and yogi move by lr per round in parameter units: no default fits, so it must be given
    refused("yogi", r"server_optimizer.lr must be set with name='yogi'")
    with pytest.raises(ConfigError, match=r"the local baseline averages nothing"):
        config_from_dict({**fed, "federated": {"algorithm": "local", "server_optimizer": "avgm"}})
    with pytest.raises(ConfigError, match=r"pipeline=centralized has none"):
        config_from_dict({"federated": {"server_optimizer": "avgm"}})


def test_the_checkpoint_keeps_the_server_optimizer_state(tmp_path):
    cfg = ServerOptimizerConfig(name="yogi", lr=0.01)
    x = {"layer.lora_A.weight": torch.randn(2, 3), "layer.lora_B.weight": torch.randn(3, 2)}
    target = {k: v + 0.01 for k, v in x.items()}
    new, opt = server_step(cfg, x, target, {})
    # a selector name with a slash (a client id) must come back whole
    state = ServerState(4, {"selector-0": new, "team/a": x}, {}, {}, {"selector-0": opt})
    save_checkpoint(tmp_path, state)
    back = load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert set(back.selectors) == {"selector-0", "team/a"} and set(back.server_optimizer) == {"selector-0"}
    assert back.server_optimizer["selector-0"].keys() == opt.keys()
    assert all(torch.equal(opt[k], back.server_optimizer["selector-0"][k]) for k in opt)
    assert all(torch.equal(x[k], back.selectors["team/a"][k]) for k in x)


class _Adds:
    """Every client returns the state it was sent plus 1 (a pseudo-gradient of 1 per round)."""

    def train(self, jobs, round_):
        return {
            n: TrainReply({k: v + 1.0 for k, v in j.state.items()}, 10, {"loss": 0.1, "seconds": 0.0})
            for n, j in jobs.items()
        }

    def score(self, selectors, round_):
        raise AssertionError("fedbis never scores")

    def optimizer_states(self):
        return {}

    def client_sizes(self):
        return {}


def test_the_round_loop_steps_each_selector_with_its_server_optimizer(tmp_path):
    cfg = config_from_dict(
        {
            "output_dir": str(tmp_path),
            "pipeline": "federated",
            "federated": {
                "algorithm": "fedbis",
                "rounds": 3,
                "clients_per_round": 2,
                "eval_every": 100,
                "checkpoint_every": 1,
                "server_optimizer": {"name": "avgm", "lr": 0.5, "momentum": 0.5},
            },
        }
    )
    loop = RoundLoop(cfg, Algorithm(cfg.federated, ["a", "b", "c"], 0), RunDir(cfg), _Adds(), quiet=True)
    state = loop.run_rounds(ServerState(0, {"selector-0": _x(0.0)}))
    # m: 1, 1.5, 1.75; x: 0.5, 1.25, 2.125
    assert state.selectors["selector-0"]["w"].item() == pytest.approx(2.125)
    assert int(state.server_optimizer["selector-0"]["step"]) == 3
    saved = load_checkpoint(list_checkpoints(cfg.run_dir / "checkpoints")[-1])
    assert saved.server_optimizer["selector-0"]["m.w"].item() == pytest.approx(1.75)
