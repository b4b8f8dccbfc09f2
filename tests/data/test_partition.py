import pytest

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


def test_unseen_clients_by_name_keep_the_given_clients_in_partition_order():
    from fedbiscuit.data.partition import choose_unseen

    names = [f"client-{i}" for i in range(6)]
    assert choose_unseen(names, ["client-4", "client-1"], seed=0) == ["client-1", "client-4"]


def test_unseen_share_is_seeded_stable_and_order_free():
    from fedbiscuit.data.partition import choose_unseen

    names = [f"client-{i}" for i in range(16)]
    chosen = choose_unseen(names, 0.25, seed=0)
    assert len(chosen) == 4  # round(0.25 * 16)
    assert choose_unseen(list(reversed(names)), 0.25, seed=0) == list(reversed(chosen))  # same set
    assert choose_unseen(names, 0.25, seed=0) == chosen
    assert choose_unseen(names, 0.25, seed=1) != chosen  # another seed, another draw
    # adding a client never moves the others: the choice is a ranking by each name's own hash
    more = choose_unseen([*names, "client-16"], 0.25, seed=0)  # round(4.25) = 4
    assert set(more) - {"client-16"} <= set(chosen) and len(more) == 4
    assert len(choose_unseen(names, 0.01, seed=0)) == 1  # at least one
    assert len(choose_unseen(names, 0.03125, seed=0)) == 1 and len(choose_unseen(names, 0.09375, seed=0)) == 2


def test_unseen_clients_that_are_unknown_or_all_are_errors_naming_them():
    from fedbiscuit.data.pairs import DataError
    from fedbiscuit.data.partition import choose_unseen

    names = ["a", "b", "c"]
    with pytest.raises(DataError, match=r"data.unseen_clients: unknown client\(s\) 'x', 'y'.*a, b, c"):
        choose_unseen(names, ["a", "x", "y"], seed=0)
    with pytest.raises(DataError, match=r"\['a', 'b', 'c'\] holds out all 3 clients"):
        choose_unseen(names, ["a", "b", "c"], seed=0)
    with pytest.raises(DataError, match="0.9 holds out all 3 clients"):
        choose_unseen(names, 0.9, seed=0)


def test_unseen_split_grades_no_prompt_of_the_labelled_slice_and_no_duplicate():
    from fedbiscuit.data.partition import unseen_split

    own = _pairs(40, clients=("u",))
    evaluation = own[:10] + [  # the same judgments again in the evaluation split, and two new ones
        Comparison("new 1", "a", "b", 1.0, "u", "t", "n1"),
        Comparison("new 2", "a", "b", 0.0, "u", "t", "n2"),
    ]
    labelled, remaining = unseen_split(own, evaluation, 0.25, None)
    assert labelled == heldout_split(own, 0.25)[1] and labelled
    assert not {p.prompt for p in labelled} & {p.prompt for p in remaining}
    assert len(remaining) == 40 - len(labelled) + 2  # each pair once, both splits
    assert len(unseen_split(own, evaluation, 0.25, 5)[1]) == 5  # capped like evaluation pairs


def test_cap_split_keeps_what_cap_keeps_and_the_rest_in_hash_order():
    from fedbiscuit.data.partition import cap_split

    pairs = _pairs(50)
    kept, spare = cap_split(pairs, 10)
    assert kept == cap(pairs, 10)
    assert sorted(p.uid for p in kept + spare) == sorted(p.uid for p in pairs)
    # a prompt with several pairs straddling the cut: its pairs beyond the cut are no spare pairs
    twice = pairs + [
        Comparison(p.prompt, p.response_b, p.response_a, 1 - p.label, p.client, "t", p.uid + "s")
        for p in pairs
    ]
    kept2, spare2 = cap_split(twice, 11)
    assert kept2 == cap(twice, 11) and not {p.prompt for p in kept2} & {p.prompt for p in spare2}
    assert len(kept2) + len(spare2) < len(twice)  # the second pair of the prompt at the cut is dropped
    assert cap_split(list(reversed(pairs)), 10) == (kept, spare)  # the order is the hash's, not the input's
    assert cap_split(pairs, None) == (pairs, []) and cap_split(pairs, 50) == (pairs, [])
