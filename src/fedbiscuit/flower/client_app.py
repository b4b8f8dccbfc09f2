"""The Flower ClientApp: SelectorClient (federated/client.py) behind Flower messages.

A SuperNode knows only its own data. Its node config says where the data is and which client it is:

    partition-id=I num-partitions=N   the node is client I of N (also its seed index and its order)
    client="name"                     optional: the client's name in the node's data (default: the I-th)
    data-root="/path"                 optional: the node's data folder (default: data.root of the run config)
    dp-clip=C dp-epsilon=E dp-delta=D dp-sensitivity=S   optional local DP on this node's updates (Flower's
                                      LocalDpMod: the update is clipped to C, then Gaussian noise added)

Everything else (model, template, training settings) comes from the server with each message, so every node
trains exactly as the run config says. Imports of torch and the model code happen inside the handlers: an
identify query, answered by a fresh process in a deployment, then costs no model load.
"""

from __future__ import annotations

import hashlib
import json
import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from . import messages as m

app = ClientApp()

# Per process, keyed by (run config, data folder): one loaded workspace (one base model), the prepared data
# until a workspace holds it, and one SelectorClient per client (its data as token ids; no model, and no
# optimizer: Flower runs keep none between rounds). A deployed SuperNode starts a new process per message, so
# this saves work where one process serves many nodes: in-process runs, and each Ray actor of a simulation,
# which loads one model and then serves whichever of the N virtual nodes Ray sends it.
_WORKSPACES: dict[str, object] = {}
_DATA: dict[str, object] = {}
_CLIENTS: dict[tuple, object] = {}


class NodeConfigError(ValueError):
    pass


def _node(context: Context) -> dict:
    node = dict(context.node_config)
    if "partition-id" not in node and "client" not in node:
        raise NodeConfigError(
            "the node config names no client: start the SuperNode with "
            '--node-config "partition-id=I num-partitions=N" (and client="name" if its data holds only it)'
        )
    return node


def _node_cfg(raw_cfg: dict, context: Context) -> tuple[str, dict]:
    """(cache key, the run config with this node's data folder)."""
    root = _node(context).get("data-root")
    if root is not None:
        raw_cfg = {**raw_cfg, "data": {**raw_cfg["data"], "root": str(root)}}
    return hashlib.sha256(json.dumps(raw_cfg, sort_keys=True).encode()).hexdigest(), raw_cfg


def _select(clients: dict, context: Context):
    """This node's ClientData and its index (partition-id)."""
    node = _node(context)
    if "client" in node:
        name = str(node["client"])
        if name not in clients:
            raise NodeConfigError(f"node config client={name!r}: the node's data holds {sorted(clients)}")
        data = clients[name]
    else:
        pid = int(node["partition-id"])
        if not 0 <= pid < len(clients):
            raise NodeConfigError(
                f"node config partition-id={pid}: the node's data holds {len(clients)} clients"
            )
        data = list(clients.values())[pid]
    return data, int(node.get("partition-id", 0))


def _data(raw_cfg: dict, context: Context):
    """This node's ClientData, without loading a model (enough to answer an identify query)."""
    from ..config import config_from_dict
    from ..data import prepare_data

    key, raw_cfg = _node_cfg(raw_cfg, context)
    if key in _WORKSPACES:
        return _select(_WORKSPACES[key].data.clients, context)[0]
    if key not in _DATA:  # an actor answers many nodes' identify queries: read the data once
        cfg = config_from_dict(raw_cfg, "the server's run config")
        _DATA[key] = prepare_data(cfg.data, seed=cfg.seed)
    return _select(_DATA[key].clients, context)[0]


def _client(raw_cfg: dict, context: Context):
    """(SelectorClient for this node, its workspace: model, encoder, config)."""
    from ..config import config_from_dict
    from ..federated.client import SelectorClient
    from ..pipeline import open_workspace
    from ..runs import configure_determinism

    key, raw_cfg = _node_cfg(raw_cfg, context)
    if key not in _WORKSPACES:
        cfg = config_from_dict(raw_cfg, "the server's run config")
        configure_determinism(cfg.deterministic)  # a node opens no run folder: fix its kernels here
        # the data an identify query already read is reused, not read again
        _WORKSPACES[key] = open_workspace(cfg, quiet=True, data=_DATA.pop(key, None))
    ws = _WORKSPACES[key]
    data, index = _select(ws.data.clients, context)
    if (key, data.name) not in _CLIENTS:
        _CLIENTS[key, data.name] = SelectorClient(index, data, ws.encoder, ws.choice_ids)
    return _CLIENTS[key, data.name], ws


@app.query("identify")
def identify(msg: Message, context: Context) -> Message:
    raw_cfg, _ = m.request_task(msg.content)
    data = _data(raw_cfg, context)
    node = context.node_config
    identity = m.Identity(
        client=data.name,
        partition_id=int(node["partition-id"]) if "partition-id" in node else None,
        num_partitions=int(node["num-partitions"]) if "num-partitions" in node else None,
        train_pairs=len(data.train),
    )
    return Message(m.identity_content(identity), reply_to=msg)


def _train(msg: Message, context: Context) -> Message:
    from ..federated.client import round_window

    start = time.perf_counter()  # the handler's time: loading model and data (once per process) + training
    raw_cfg, task = m.request_task(msg.content)
    client, ws = _client(raw_cfg, context)
    cfg = ws.cfg
    if task.get("probe") == "gradient":  # grouping: gradients
        reply = client.gradient_step(ws.model, m.record_state(msg.content[m.STATE]), int(task["pairs"]) or None,
                                     cfg.train.batch_size)  # fmt: skip
        reply.metrics["handler_seconds"] = time.perf_counter() - start
        return Message(m.train_reply_content(reply), reply_to=msg)
    reply = client.train(
        ws.model,
        m.record_state(msg.content[m.STATE]),
        cfg.train,
        cfg.federated.local_steps,
        int(task["seed"]),
        reset_optimizer=True,  # the server refuses reset_optimizer=false on Flower (no client state kept)
        schedule_window=round_window(cfg.federated.rounds, cfg.federated.local_steps, int(task["round"])),
    )
    reply.metrics["handler_seconds"] = time.perf_counter() - start
    return Message(m.train_reply_content(reply), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    node = context.node_config
    if "dp-clip" in node:  # the node's own choice: its update leaves clipped and noised
        from flwr.clientapp.mod import LocalDpMod

        mod = LocalDpMod(
            clipping_norm=float(node["dp-clip"]),
            sensitivity=float(node.get("dp-sensitivity", node["dp-clip"])),
            epsilon=float(node["dp-epsilon"]),
            delta=float(node.get("dp-delta", 1e-5)),
        )
        return mod(msg, context, _train)
    return _train(msg, context)


@app.evaluate()
def score(msg: Message, context: Context) -> Message:
    raw_cfg, task = m.request_task(msg.content)
    client, ws = _client(raw_cfg, context)
    selectors = m.request_selectors(msg.content)
    fb = ws.cfg.federated.fedbiscuit
    reply = client.score(ws.model, selectors, fb.grouping_pairs, ws.cfg.eval.batch_size)
    return Message(m.score_reply_content(reply, list(selectors)), reply_to=msg)


@app.query("echo")
def echo(msg: Message, context: Context) -> Message:
    from flwr.app import RecordDict

    return Message(RecordDict({m.STATE: msg.content[m.STATE]}), reply_to=msg)


def clear_cache() -> None:
    """Drop the models and clients loaded in this process (in-process runs and tests)."""
    _WORKSPACES.clear()
    _DATA.clear()
    _CLIENTS.clear()
