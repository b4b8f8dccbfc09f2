"""Server-side optimisation: how a selector moves by what its members sent back this round.

Reddi et al., "Adaptive Federated Optimization" (ICLR 2021). The aggregation rule (FedAvg, or the FedBiscuit
reference's 1/N delta) gives a target adapter; the round's pseudo-gradient is d = target - x, and the server
optimizer turns d into the step:

    avg   x += lr * d                                  (lr = 1: the target itself, plain FedAvg)
    avgm  m = momentum * m + d;  x += lr * m           (Flower's FedAvgM)
    adam  m = b1 m + (1 - b1) d;  v = b2 v + (1 - b2) d^2;
          x += lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + tau)     (Flower's FedAdam)
    yogi  m as adam;  v = v - (1 - b2) d^2 sign(v - d^2);  x += lr * m / (sqrt(v) + tau)   (Flower's FedYogi)

Flower's strategies hold one model's state and take their bias correction from the server round; here every
selector has its own state and its own step count t (a FedBiscuit selector is not updated in every round), so
the rules are written out, with t counted per selector from 1 (Flower's FedAdam uses round + 1). Moments are
kept in float32 on the CPU and computed in float64, so a resumed run repeats the same steps bit for bit.
"""

from __future__ import annotations

import torch

from ..config import ServerOptimizerConfig
from ..models.adapters import AdapterState

# A selector's state: "step" -> a 0-d int64 tensor; "m.<tensor>" and "v.<tensor>" -> float32 moments.
OptimizerState = dict[str, torch.Tensor]


def server_step(
    cfg: ServerOptimizerConfig, x: AdapterState, target: AdapterState, state: OptimizerState
) -> tuple[AdapterState, OptimizerState]:
    """(the selector's new adapter, its new optimizer state) after one round whose aggregate is ``target``."""
    if cfg.plain:
        return target, state
    t = int(state["step"]) + 1 if "step" in state else 1
    new_state: OptimizerState = {"step": torch.tensor(t, dtype=torch.int64)}
    out: AdapterState = {}
    b1, b2 = cfg.betas
    for key, x0 in x.items():
        xd = x0.to(torch.float64)
        d = target[key].to(torch.float64) - xd
        if cfg.name == "avg":
            step = d
        elif cfg.name == "avgm":
            m = cfg.momentum * _moment(state, "m", key, d) + d
            new_state[f"m.{key}"] = m.float()
            step = m
        else:
            m = b1 * _moment(state, "m", key, d) + (1 - b1) * d
            v_old = _moment(state, "v", key, d)
            if cfg.name == "adam":
                v = b2 * v_old + (1 - b2) * d * d
                scale = (1 - b2**t) ** 0.5 / (1 - b1**t)
            else:  # yogi: v moves towards d^2 by at most (1 - b2) d^2, whichever side it is on
                v = v_old - (1 - b2) * d * d * torch.sign(v_old - d * d)
                scale = 1.0
            new_state[f"m.{key}"], new_state[f"v.{key}"] = m.float(), v.float()
            step = scale * m / (v.clamp_min(0).sqrt() + cfg.tau)
        out[key] = (xd + cfg.lr * step).to(x0.dtype)
    return out, new_state


def _moment(state: OptimizerState, slot: str, key: str, like: torch.Tensor) -> torch.Tensor:
    value = state.get(f"{slot}.{key}")
    return torch.zeros_like(like) if value is None else value.to(torch.float64)
