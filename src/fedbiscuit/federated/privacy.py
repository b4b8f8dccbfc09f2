"""Central differential privacy on adapter updates, with Flower's own DP functions.

The server-side fixed-clipping scheme of Flower's ``DifferentialPrivacyServerSideFixedClipping`` (Andrew et
al. / McMahan et al.), applied per selector: each client's update (its returned adapter minus the selector it
was sent) is clipped to L2 norm ``clip_norm`` with ``compute_clip_model_update``; after averaging the n
members of a selector, Gaussian noise with std ``compute_stdv(noise_multiplier, clip_norm, n)`` =
z * C / n is added to that selector. What it protects: the released selectors (and checkpoints) bound any one
client's influence in a round. What it does not: the server still sees each clipped update in the clear
(that needs secure aggregation), and the privacy budget over many rounds is for an accountant to compute.

The noise comes from a generator seeded by (seed, round, selector), so a resumed run replays it exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import torch
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv

from ..config import CentralDPConfig
from ..models.adapters import AdapterState
from .checkpoint import ServerState
from .client import TrainReply


def _arrays(state: AdapterState) -> list[np.ndarray]:
    return [t.detach().cpu().numpy().astype(np.float64) for t in state.values()]


class CentralDP:
    def __init__(self, cfg: CentralDPConfig):
        self.cfg = cfg

    def clip(
        self, replies: dict[str, list[TrainReply]], selectors: dict[str, AdapterState]
    ) -> dict[str, list[TrainReply]]:
        out: dict[str, list[TrainReply]] = {}
        for name, group in replies.items():
            ref = selectors[name]
            out[name] = []
            for reply in group:
                arrays = _arrays(reply.state)
                compute_clip_model_update(arrays, _arrays(ref), self.cfg.clip_norm)  # in place
                state = {
                    k: torch.from_numpy(a).to(t.dtype)
                    for (k, t), a in zip(reply.state.items(), arrays, strict=True)
                }
                out[name].append(replace(reply, state=state))
        return out

    def add_noise(
        self, state: ServerState, replies: dict[str, list[TrainReply]], seed: int, round_: int
    ) -> None:
        for name, group in replies.items():
            if not group or self.cfg.noise_multiplier == 0:
                continue
            std = compute_stdv(self.cfg.noise_multiplier, self.cfg.clip_norm, len(group))
            digest = hashlib.sha256(f"dp:{seed}:{round_}:{name}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            state.selectors[name] = {
                k: (t.to(torch.float64) + torch.from_numpy(rng.normal(0.0, std, tuple(t.shape)))).to(t.dtype)
                for k, t in state.selectors[name].items()
            }
