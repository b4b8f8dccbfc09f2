"""What travels between the ServerApp and the ClientApps, as Flower RecordDicts.

Server -> client: the run's resolved config (JSON; settings only, never data) and adapter tensors.
Client -> server: adapter tensors and numbers (a TrainReply or the losses of a ScoreReply); the identify
query also returns the client's name and partition numbers. No text and no token ids ever leave a client.

A train request and its reply each hold exactly one ArrayRecord with the same keys, which is the shape
Flower's LocalDpMod needs to clip and noise the update on the client.

Size: Flower 1.41 does not send a message as one blob. It splits the message into a tree of objects
(records, arrays, and each array's bytes in ArrayChunks of at most FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE =
5 MiB), and pushes and pulls each object as its own HTTP request, content-addressed by SHA-256. An adapter of
any size therefore streams in <= 5 MiB pieces; there is no whole-message limit to hit (the legacy gRPC Fleet
API's limit is 2 GiB). A SmolLM2 r=8 q/v adapter is 120 arrays of 1.84 MB in total.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

TRAIN = "train"  # train the sent selector for local_steps steps; reply: adapter + metrics
SCORE = "evaluate"  # score every sent selector on the held-out slice; reply: one loss per selector
IDENTIFY = "query.identify"  # which client this node holds; reply: name, partition-id, num-partitions
ECHO = "query.echo"  # send the arrays back unchanged (transport self-test)

STATE = "state"
TASK = "task"


@dataclass
class Identity:
    client: str
    partition_id: int | None
    num_partitions: int | None
    train_pairs: int


# ------------------------------------------------------------------------------------ adapter states
def state_record(state) -> ArrayRecord:
    return ArrayRecord(dict(state))  # a torch state dict: dtype and shape travel with each array


def record_state(record: ArrayRecord) -> dict:
    return dict(record.to_torch_state_dict())


# ------------------------------------------------------------------------------------ requests
def task_record(config_json: str, **values) -> ConfigRecord:
    return ConfigRecord({"config": config_json, **values})


def train_content(
    config_json: str, selector: str, state, seed: int, round_: int, probe: str | None = None, pairs: int = 0
) -> RecordDict:
    """``probe="gradient"``: one gradient step over the first ``pairs`` training pairs (0: all) instead of a
    round of training (grouping: gradients)."""
    probed = {"probe": probe, "pairs": pairs} if probe else {}
    return RecordDict(
        {
            STATE: state_record(state),
            TASK: task_record(config_json, selector=selector, seed=seed, round=round_, **probed),
        }
    )


def score_content(config_json: str, selectors: dict, round_: int) -> RecordDict:
    content = RecordDict({TASK: task_record(config_json, selectors=list(selectors), round=round_)})
    for i, state in enumerate(selectors.values()):
        content[f"selector-{i}"] = state_record(state)  # positional: selector names may be client names
    return content


def request_task(content: RecordDict) -> tuple[dict, dict]:
    """(run config as a dict, the other task values)."""
    task = dict(content[TASK])
    return json.loads(task.pop("config")), task


def request_selectors(content: RecordDict) -> dict:
    names = list(content[TASK]["selectors"])
    return {name: record_state(content[f"selector-{i}"]) for i, name in enumerate(names)}


# ------------------------------------------------------------------------------------ replies
def train_reply_content(reply) -> RecordDict:
    metrics = {"num_samples": int(reply.num_samples), **{k: float(v) for k, v in reply.metrics.items()}}
    return RecordDict({STATE: state_record(reply.state), "metrics": MetricRecord(metrics)})


def read_train_reply(content: RecordDict):
    from ..federated.client import TrainReply

    metrics = dict(content["metrics"])
    num_samples = metrics.pop("num_samples")
    return TrainReply(
        record_state(content[STATE]), int(num_samples), {k: float(v) for k, v in metrics.items()}
    )


def score_reply_content(reply, selector_names: list[str]) -> RecordDict:
    """A ScoreReply: per selector its mean loss and the standard error of its difference to the best."""
    values = {f"loss-{i}": float(reply.losses[name]) for i, name in enumerate(selector_names)}
    values |= {f"se-{i}": float(reply.diff_se.get(name, 0.0)) for i, name in enumerate(selector_names)}
    return RecordDict({"losses": MetricRecord({**values, "num_pairs": int(reply.num_pairs)})})


def read_score_reply(content: RecordDict, selector_names: list[str]):
    from ..federated.client import ScoreReply

    losses = content["losses"]
    return ScoreReply(
        losses={name: float(losses[f"loss-{i}"]) for i, name in enumerate(selector_names)},
        num_pairs=int(losses["num_pairs"]),
        diff_se={name: float(losses[f"se-{i}"]) for i, name in enumerate(selector_names)},
    )


def identity_content(identity: Identity) -> RecordDict:
    config = {"client": identity.client}
    if identity.partition_id is not None:
        config["partition-id"] = identity.partition_id
    if identity.num_partitions is not None:
        config["num-partitions"] = identity.num_partitions
    return RecordDict(
        {"identity": ConfigRecord(config), "sizes": MetricRecord({"train_pairs": identity.train_pairs})}
    )


def read_identity(content: RecordDict) -> Identity:
    ident = content["identity"]
    return Identity(
        client=str(ident["client"]),
        partition_id=int(ident["partition-id"]) if "partition-id" in ident else None,
        num_partitions=int(ident["num-partitions"]) if "num-partitions" in ident else None,
        train_pairs=int(content["sizes"]["train_pairs"]),
    )


# ------------------------------------------------------------------------------------ accounting
def wire_bytes(message: Message) -> int:
    """Bytes of every object the message is sent as (metadata, records, array chunks), deduplicated as
    Flower deduplicates them; HTTP and TLS framing excluded."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
