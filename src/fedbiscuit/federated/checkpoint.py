"""Atomic checkpoints of the server state: every selector adapter, the cluster assignment, the round.

One safetensors file per checkpoint holds all adapters (keys ``<selector>/<tensor>``) and the rest as JSON
metadata, so a checkpoint is complete or absent, never torn; every file is synced to the disk with its folder
before it counts (durable.py), so this holds after a power loss too. Client randomness is derived from
(seed, round, client), so no RNG state needs saving; optimizer states are saved only when they persist.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..durable import durable_write
from ..models.adapters import AdapterState, read_adapter, save_adapter

_SERVER_OPT = "@server_optimizer/"  # key prefix of the server optimizer's tensors
_NAME = re.compile(r"^round-(\d{6})\.safetensors$")


@dataclass
class ServerState:
    round: int  # the next round to run
    selectors: dict[str, AdapterState]
    clusters: dict[str, str] = field(default_factory=dict)  # client -> selector it trains (after grouping)
    optimizer_states: dict[str, dict] = field(default_factory=dict)  # client -> AdapterW state (if kept)
    # selector -> the server optimizer's state for it (server_optimizer.py; empty for plain FedAvg)
    server_optimizer: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def save_checkpoint(folder: Path, state: ServerState, keep: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"round-{state.round:06d}.safetensors"
    if state.optimizer_states:
        with durable_write(path.with_suffix(".optim.pt"), suffix=".pt") as tmp:
            torch.save(state.optimizer_states, tmp)
    flat = {f"{sel}/{k}": v for sel, st in state.selectors.items() for k, v in st.items()}
    # the server optimizer's moments in the same file, so a checkpoint never holds selectors without them
    flat |= {
        f"{_SERVER_OPT}{sel}/{k}": v for sel, st in state.server_optimizer.items() for k, v in st.items()
    }
    meta = {
        "server": json.dumps(
            {"round": state.round, "clusters": state.clusters, "selectors": list(state.selectors)}
        )
    }
    save_adapter(flat, path, meta)  # written last: its presence marks the checkpoint complete
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
        old.with_suffix(".optim.pt").unlink(missing_ok=True)
    return path


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def load_checkpoint(path: Path) -> ServerState:
    flat, meta = read_adapter(path)
    if "server" not in meta:
        raise ValueError(f"{path}: not a fedbiscuit server checkpoint (no server metadata)")
    info = json.loads(meta["server"])
    selectors: dict[str, AdapterState] = {name: {} for name in info["selectors"]}
    server_opt: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        opt = key.startswith(_SERVER_OPT)
        sel, _, tensor = key.removeprefix(_SERVER_OPT).rpartition("/")  # tensor names have no "/"; selector
        (server_opt.setdefault(sel, {}) if opt else selectors[sel])[tensor] = value  # names (client ids) may
    optim_path = path.with_suffix(".optim.pt")
    optim = torch.load(optim_path, weights_only=True) if optim_path.is_file() else {}
    return ServerState(info["round"], selectors, info["clusters"], optim, server_opt)
