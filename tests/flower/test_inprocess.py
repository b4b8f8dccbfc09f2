"""The Flower ServerApp + ClientApp in one process against the local engine, on the same seed and data."""

import json
from pathlib import Path

import pytest
import torch

from fedbiscuit.config import config_from_dict
from fedbiscuit.data.synthetic import planted_run_config
from fedbiscuit.federated.checkpoint import list_checkpoints, load_checkpoint
from fedbiscuit.flower import client_app, messages
from fedbiscuit.flower.inprocess import InProcessGrid, run_inprocess
from fedbiscuit.pipeline import run_federated

FEDBISCUIT = {
    "algorithm": "fedbiscuit",
    "rounds": 4,
    "clients_per_round": 3,
    "fedbiscuit": {"num_selectors": 2, "warmup_rounds": 1, "regroup_every": 1},
}


def _final(run_dir):
    return load_checkpoint(list_checkpoints(Path(run_dir) / "checkpoints")[-1])


def _nodes(n):
    return [{"partition-id": i, "num-partitions": n} for i in range(n)]


@pytest.mark.parametrize(
    ("server", "schedule", "grouping"),
    [
        ({}, {}, "loss"),
        (
            {"server_optimizer": {"name": "avgm", "lr": 0.5}},
            {"schedule": "linear", "warmup_steps": 2},
            "loss",
        ),
        ({}, {}, "updates"),
        ({}, {}, "gradients"),
        # the adaptive server optimizers keep moment state per selector across rounds: the same on both engines
        ({"server_optimizer": {"name": "adam", "lr": 0.01}}, {}, "loss"),
        (
            {"server_optimizer": {"name": "yogi", "lr": 0.01}},
            {"schedule": "cosine", "warmup_steps": 2},
            "loss",
        ),
    ],
)
def test_flower_apps_end_with_the_local_engines_adapters(tmp_path, server, schedule, grouping):
    fedbiscuit = {**FEDBISCUIT, "fedbiscuit": {**FEDBISCUIT["fedbiscuit"], "grouping": grouping}}
    raw = planted_run_config(tmp_path, "local", clients=4, **fedbiscuit, **server)
    raw["train"].update(schedule)
    local = run_federated(config_from_dict(raw), quiet=True)
    flower = run_inprocess(config_from_dict({**raw, "name": "flower"}), _nodes(4))
    a, b = _final(local["run_dir"]), _final(flower["run_dir"])
    assert a.round == b.round == 4 and a.clusters == b.clusters and len(set(b.clusters.values())) == 2
    for sel, st in a.selectors.items():
        for k, v in st.items():
            assert (v - b.selectors[sel][k]).abs().max().item() <= 1e-6, (sel, k)
    records = [json.loads(x) for x in (Path(flower["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    groupings = [r for r in records if r["event"] == "grouping"]
    assert [g["round"] for g in groupings] == [2, 3]
    assert len(groupings[0]["losses" if grouping == "loss" else "margins"]) == 4
    sent = [r for r in records if r["event"] == "messages" and r["kind"] == "train"]
    probes = 0 if grouping == "loss" else 2  # each grouping by updates or gradients asks all 4 clients once
    assert len(sent) == 4 + probes and sorted(len(r["up_bytes"]) for r in sent) == [3] * 4 + [4] * probes


def test_replies_carry_tensors_and_numbers_only(tmp_path, monkeypatch):
    replies = []
    real = InProcessGrid.pull_messages

    def spy(self, ids):
        out = real(self, ids)
        replies.extend(out)
        return out

    monkeypatch.setattr(InProcessGrid, "pull_messages", spy)
    raw = planted_run_config(tmp_path, "f", clients=4, **{**FEDBISCUIT, "rounds": 3})
    run_inprocess(config_from_dict(raw), _nodes(4))
    texts = [json.loads(x) for x in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    strings = {t[k] for t in texts for k in ("prompt", "chosen", "rejected")} - {"yes", "no"}
    kinds = {r.metadata.message_type for r in replies}
    assert kinds == {messages.IDENTIFY, messages.TRAIN, messages.SCORE}
    for reply in replies:
        assert not reply.has_error()
        content = reply.content
        for record in content.array_records.values():
            assert all(k.startswith("base_model.model.") and "lora_" in k for k in record)
            assert all(t.is_floating_point() for t in record.to_torch_state_dict().values())
        for record in content.metric_records.values():
            assert all(isinstance(v, int | float) for v in record.values())
        for record in content.config_records.values():  # only the identify reply: the client's name
            assert set(record) <= {"client", "partition-id", "num-partitions"}
        blob = b"".join(
            o.deflate() for o in messages.get_all_nested_objects(reply).values()
        )  # the wire bytes
        assert not any(s.encode() in blob for s in strings), "a reply carries training text"


def test_a_dead_node_is_left_out_and_a_restarted_one_takes_its_client_back(tmp_path):
    raw = planted_run_config(
        tmp_path, "dead", clients=4, **{**FEDBISCUIT, "rounds": 3, "clients_per_round": 4}
    )
    raw["federated"]["flower"] = {"reply_timeout_s": 1}
    cfg = config_from_dict(raw)
    grid = InProcessGrid(client_app.app, _nodes(4), seed=0)
    dead = list(grid.contexts)[1]
    real_pull = grid.pull_messages
    calls = {"train": 0}

    def pull(ids):  # node 1 dies after round 0; restarts (new node id) while round 1 waits for it
        out = real_pull(ids)
        if any(r.metadata.message_type == messages.TRAIN for r in out):
            calls["train"] += 1
            if calls["train"] == 1:
                grid.down.add(dead)
            if calls["train"] == 2:
                grid.add_node(dict(grid.contexts[dead].node_config))
        return out

    grid.pull_messages = pull
    result = run_inprocess(cfg, [], grid=grid)
    records = [json.loads(x) for x in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r["event"] == "round"]
    assert [sorted(r["rejected"]) for r in rounds] == [[], ["client-1"], []]
    assert "no reply within 1 s" in rounds[1]["rejected"]["client-1"]
    assert len(rounds[1]["clients"]) == 3 and len(rounds[2]["clients"]) == 4  # the others carried round 1
    grouping = [r for r in records if r["event"] == "grouping"]
    assert len(grouping[0]["losses"]) == 4  # the restarted node scored in the grouping round
    assert result["rounds"] == 3 and result["faults"] == {"no reply within 1 s": 1}


@pytest.mark.parametrize("bad", [{"algorithm": "centralized"}, {"reset_optimizer": False}])
def test_the_flower_engine_refuses_what_it_cannot_do(tmp_path, bad):
    raw = planted_run_config(tmp_path, "bad", clients=4, **bad)
    with pytest.raises(ValueError, match="Flower engine|local engine"):
        run_inprocess(config_from_dict(raw), _nodes(4))


def test_a_smollm2_sized_adapter_streams_through_the_message_path():
    # SmolLM2-135M r=8 q/v LoRA: 30 layers x (q: A 8x576, B 576x8; v: A 8x576, B 192x8) = 1.84 MB in fp32,
    # plus one 6.4 MB array that Flower must cut into 5 MiB chunks.
    gen = torch.Generator().manual_seed(0)
    shapes = {
        "q_proj.lora_A": (8, 576),
        "q_proj.lora_B": (576, 8),
        "v_proj.lora_A": (8, 576),
        "v_proj.lora_B": (192, 8),
    }
    state = {
        f"base_model.model.model.layers.{i}.self_attn.{name}.weight": torch.randn(shape, generator=gen)
        for i in range(30)
        for name, shape in shapes.items()
    }
    assert sum(t.numel() * 4 for t in state.values()) == 1_843_200  # exactly the SmolLM2 adapter
    state["base_model.model.extra.lora_B.weight"] = torch.randn(1_600_000, generator=gen)  # 6.4 MB > 5 MiB
    payload = sum(t.numel() * 4 for t in state.values())
    msg = messages.Message(
        messages.RecordDict({messages.STATE: messages.state_record(state)}), 7, messages.ECHO
    )
    from fedbiscuit.flower.inprocess import over_the_wire

    msg.metadata.__dict__["_message_id"] = "m"
    objects = messages.get_all_nested_objects(msg)
    chunks = [o for o in objects.values() if type(o).__name__ == "ArrayChunk"]
    assert max(len(o.deflate()) for o in objects.values()) <= 5 * 1024 * 1024 + 1024
    assert len(chunks) >= 122  # the big array in two chunks, each small one in its own
    back = messages.record_state(over_the_wire(msg).content[messages.STATE])
    assert all(torch.equal(back[k], v) for k, v in state.items())
    assert messages.wire_bytes(msg) >= payload


def test_local_dp_on_a_node_uses_flowers_mod_on_its_updates(tmp_path):
    raw = planted_run_config(tmp_path, "plain", clients=4, rounds=2, clients_per_round=4)
    plain = run_inprocess(config_from_dict(raw), _nodes(4))
    dp_nodes = [{**n, "dp-clip": 0.01, "dp-epsilon": 10.0, "dp-delta": 1e-5} for n in _nodes(4)]
    noisy = run_inprocess(config_from_dict({**raw, "name": "dp"}), dp_nodes)
    a, b = _final(plain["run_dir"]).selectors["selector-0"], _final(noisy["run_dir"]).selectors["selector-0"]
    assert noisy["rounds"] == 2 and any(not torch.allclose(a[k], b[k]) for k in a)


def test_a_node_without_a_client_is_reported_and_the_run_does_not_start(tmp_path):
    from fedbiscuit.federated.rounds import TooFewClientsError

    raw = planted_run_config(tmp_path, "orphan", clients=4)
    raw["federated"]["flower"] = {"wait_for_nodes_s": 1, "num_clients": 4}
    nodes = [*_nodes(3), {"partition-id": 9, "num-partitions": 4}]
    with pytest.raises(TooFewClientsError, match="3 of 4 clients"):
        run_inprocess(config_from_dict(raw), nodes)
    records = [
        json.loads(x) for x in (tmp_path / "runs" / "orphan" / "metrics.jsonl").read_text().splitlines()
    ]
    failed = [f for r in records if r["event"] == "messages" for f in r["failed"].values()]
    assert failed and all("partition-id=9" in f for f in failed)
