from fedbiscuit.config import PartitionConfig
from fedbiscuit.data.pairs import Comparison, LoadReport
from fedbiscuit.data.partition import cap, heldout_split, partition


def _pairs(n=200, clients=("c1", "c2")):
    return [
        Comparison(f"prompt {i}", f"a{i}", f"b{i}", float(i % 2), clients[i % len(clients)], "t", str(i))
        for i in range(n)
    ]


def test_heldout_by_prompt_hash_keeps_swapped_copies_together():
    pairs = _pairs()
    swapped = [
        Comparison(p.prompt, p.response_b, p.response_a, 1 - p.label, p.client, "t", p.uid + "s")
        for p in pairs
    ]
    train, held = heldout_split(pairs + swapped, 0.2)
    held_prompts = {p.prompt for p in held}
    assert not held_prompts & {p.prompt for p in train}
    assert 0.1 < len(held) / 400 < 0.3
    assert heldout_split(pairs + swapped, 0.2) == (train, held)  # deterministic


def test_split_each_is_the_same_in_every_split():
    pairs = _pairs()
    clients, namer = partition(pairs, PartitionConfig(split_each=4), 0, LoadReport())
    assert sorted(clients) == [f"c{i}#{j}" for i in (1, 2) for j in range(4)]
    assert sum(map(len, clients.values())) == 200
    for name, members in clients.items():
        assert all(namer(p.client, p.prompt) == name for p in members)


def test_iid_partition_loses_nothing():
    pairs = _pairs(101)
    clients, _ = partition(pairs, PartitionConfig(method="iid", num_clients=5), 0, LoadReport())
    assert len(clients) == 5
    assert sorted(p.uid for c in clients.values() for p in c) == sorted(p.uid for p in pairs)
    assert max(map(len, clients.values())) - min(map(len, clients.values())) <= 1


def test_cap_is_deterministic_and_order_free():
    pairs = _pairs(50)
    assert cap(pairs, 10) == cap(list(reversed(pairs)), 10)
    assert len(cap(pairs, 10)) == 10 and cap(pairs, None) is pairs
