"""The Flower ServerApp and ClientApp in one process, without a SuperLink: for tests and quick runs.

InProcessGrid is a Flower Grid whose nodes are ClientApp calls in this process. Every message and every
reply still goes the way Flower sends it: split into its object tree (array chunks of <= 5 MiB), each object
serialised to bytes, and rebuilt from those bytes on the other side, so what a node receives is exactly what
a SuperNode would. Node ids are random 64-bit numbers as in a deployment; each node has its own node config
and Context (with its persistent state), as a SuperNode does.
"""

from __future__ import annotations

import random
import traceback
import uuid
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity


def server_task_identity(run_id: int = 1) -> None:
    """Messages built by a ServerApp take their run and source node from the task identity, which Flower's
    own runtimes set before calling the ServerApp."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID


def over_the_wire(message: Message) -> Message:
    """The message as the receiving side rebuilds it from the bytes Flower sends (ids and all)."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
    copy = inflate_object_from_contents(message.object_id, contents)
    copy.metadata.__dict__["_message_id"] = message.metadata.message_id  # not part of the serialised body
    return copy


class InProcessGrid(Grid):
    def __init__(
        self, client_app: ClientApp, node_configs: list[dict], run_config: dict | None = None, seed=0
    ):
        rng = random.Random(f"nodes:{seed}")
        self.client_app = client_app
        self.run_id = rng.getrandbits(63)
        self.contexts: dict[int, Context] = {}
        for config in node_configs:
            node_id = rng.getrandbits(63)
            self.contexts[node_id] = Context(
                self.run_id, node_id, dict(config), RecordDict(), dict(run_config or {})
            )
        self.down: set[int] = set()  # nodes that are listed but never answer (a crashed SuperNode)
        self._replies: dict[str, Message] = {}
        self._run = Run.create_empty(self.run_id)
        server_task_identity(self.run_id)

    # ------------------------------------------------------------------ nodes
    def add_node(self, config: dict) -> int:
        """A node joining mid-run (e.g. a restarted SuperNode: new id, same node config)."""
        node_id = random.getrandbits(63)
        self.contexts[node_id] = Context(self.run_id, node_id, dict(config), RecordDict(), {})
        return node_id

    # ------------------------------------------------------------------ the Grid interface
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            ids.append(msg.metadata.message_id)
            if msg.metadata.dst_node_id in self.down:
                continue
            received = over_the_wire(msg)
            try:
                reply = self.client_app(received, self.contexts[msg.metadata.dst_node_id])
            except Exception as err:  # as a SuperNode does: the server gets an error reply, not the exception
                reason = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}"
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=received)
            reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self._replies[msg.metadata.message_id] = over_the_wire(reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_inprocess(
    cfg, node_configs: list[dict], resume: bool = False, overwrite: bool = False, grid=None
) -> dict:
    """The ServerApp's run over an InProcessGrid of ClientApps: one node per config."""
    from . import client_app as clients
    from .server_app import run_server

    grid = grid or InProcessGrid(clients.app, node_configs, seed=cfg.seed)
    try:
        return run_server(grid, cfg, resume=resume, overwrite=overwrite)
    finally:
        clients.clear_cache()
