import random

import pytest
import torch

from fedbiscuit.config import FedBiscuitConfig, FederatedConfig
from fedbiscuit.federated.algorithm import Algorithm
from fedbiscuit.federated.checkpoint import ServerState
from fedbiscuit.federated.client import TrainReply


def _algo(fb: dict | None = None, **kw):
    fb = FedBiscuitConfig(num_selectors=3, warmup_rounds=2, regroup_every=4, **(fb or {}))
    cfg = FederatedConfig(algorithm="fedbiscuit", clients_per_round=2, fedbiscuit=fb, **kw)
    return Algorithm(cfg, [f"c{i}" for i in range(6)], seed=0)


def _w(v: float) -> dict:
    return {"w": torch.full((2,), float(v))}


def test_warmup_trains_selectors_in_turn_then_clusters():
    algo = _algo()
    state = ServerState(0, {s: {} for s in algo.selectors})
    warm = [set(algo.plan(state, r).values()) for r in range(6)]
    assert warm == [{"selector-0"}] * 2 + [{"selector-1"}] * 2 + [{"selector-2"}] * 2
    assert [r for r in range(20) if algo.regroup_due(r)] == [6, 10, 14, 18]
    state.clusters = {f"c{i}": f"selector-{i % 3}" for i in range(6)}
    plan = algo.plan(state, 7)
    assert len(plan) == 2 and all(sel == state.clusters[c] for c, sel in plan.items())


def test_the_oracle_trains_one_selector_per_known_group_from_round_0():
    clients = ["harmless-base#0", "harmless-base#1", "helpful-base#0", "helpful-base#1", "solo"]
    oracle = Algorithm(FederatedConfig(algorithm="oracle", clients_per_round=3), clients, 0)
    assert oracle.selectors == ["harmless-base", "helpful-base", "solo"] and not oracle.regroup_due(0)
    clusters = oracle.initial_clusters()
    assert clusters == {c: c.split("#")[0] for c in clients}
    for r in range(5):
        assert all(sel == clusters[c] for c, sel in oracle.plan(ServerState(r, {}, clusters), r).items())
    fedbis = Algorithm(FederatedConfig(algorithm="fedbis"), clients, 0)
    assert fedbis.initial_clusters() == {}


def test_local_and_fedbis_selectors():
    local = Algorithm(FederatedConfig(algorithm="local", clients_per_round=3), ["a", "b", "c", "d"], 0)
    assert local.selectors == ["a", "b", "c", "d"]
    assert all(c == s for c, s in local.plan(ServerState(0, {}), 0).items())
    fedbis = Algorithm(FederatedConfig(algorithm="fedbis", clients_per_round=3), ["a", "b", "c", "d"], 0)
    assert fedbis.selectors == ["selector-0"] and not fedbis.regroup_due(100)


def test_group_follows_the_configured_assignment_where_greedy_and_optimal_differ():
    # Every client's best selector is 0, which holds only two. Optimal keeps the two that lose most elsewhere
    # (c2, c1: total 0.65); greedy keeps the first two in its shuffled order, whatever the cost.
    losses = {
        "c0": [0.0, 0.1],
        "c1": [0.0, 0.2],
        "c2": [0.0, 1.0],
        "c3": [0.5, 0.55],
    }
    losses = {c: {f"selector-{k}": v for k, v in enumerate(row)} for c, row in losses.items()}
    cfg = dict(algorithm="fedbiscuit", clients_per_round=2)
    opt = Algorithm(FederatedConfig(**cfg, fedbiscuit=FedBiscuitConfig(num_selectors=2)), list(losses), 0)
    assert opt.group(losses, 6) == {
        "c0": "selector-1",
        "c1": "selector-0",
        "c2": "selector-0",
        "c3": "selector-1",
    }
    greedy = Algorithm(
        FederatedConfig(**cfg, fedbiscuit=FedBiscuitConfig(num_selectors=2, assignment="greedy")),
        list(losses),
        0,
    )
    order = list(range(4))
    random.Random("greedy:6").shuffle(order)  # seed * 7919 + round: a fresh client order per grouping round
    assert order == [2, 1, 3, 0]
    assert greedy.group(losses, 6) == {
        "c0": "selector-1",
        "c1": "selector-0",
        "c2": "selector-0",
        "c3": "selector-1",
    }
    random.Random("greedy:7").shuffle(order := list(range(4)))
    kept = {f"c{i}" for i in order[:2]}
    assert kept != {"c1", "c2"}  # round 7's order is one where greedy misses the optimum
    assert greedy.group(losses, 7) == {c: "selector-0" if c in kept else "selector-1" for c in losses}


def test_paper_rule_averages_plainly_during_warm_up_and_steps_by_one_nth_after():
    # six clients, K=3, W=2: rounds 0-5 warm up, round 6 is the first grouping
    algo = _algo({"update": "paper"})
    replies = {"selector-0": [TrainReply(_w(3), 10), TrainReply(_w(5), 30)]}
    warm = ServerState(1, {"selector-0": _w(1)})
    algo.aggregate(warm, replies, round_=1)
    assert torch.allclose(warm.selectors["selector-0"]["w"], torch.full((2,), 4.0))  # the members' mean
    grouped = ServerState(6, {"selector-0": _w(1)})
    algo.aggregate(grouped, replies, round_=6)
    assert torch.allclose(grouped.selectors["selector-0"]["w"], torch.full((2,), 1 + (2 + 4) / 6))
    assert [algo.update_rule(r) for r in (0, 5, 6, 9)] == ["mean", "mean", "paper", "paper"]
    assert _algo().update_rule(6) == "mean"


def test_paper_rule_weights_each_delta_by_its_share_of_all_clients_samples():
    algo = _algo({"update": "paper"}, weighting="samples")
    sizes = {"c0": 10, "c1": 30, "c2": 20, "c3": 20, "c4": 20, "c5": 20}  # 120 in all
    replies = {"selector-0": [TrainReply(_w(3), 10), TrainReply(_w(5), 30)]}
    assert not algo.needs_client_sizes(5) and algo.needs_client_sizes(6)
    grouped = ServerState(6, {"selector-0": _w(1)})
    algo.aggregate(grouped, replies, round_=6, client_sizes=sizes)
    assert torch.allclose(grouped.selectors["selector-0"]["w"], torch.full((2,), 1 + (10 * 2 + 30 * 4) / 120))
    warm = ServerState(0, {"selector-0": _w(1)})
    algo.aggregate(warm, replies, round_=0)  # warm-up: FedAvg weighted by samples
    assert torch.allclose(warm.selectors["selector-0"]["w"], torch.full((2,), (10 * 3 + 30 * 5) / 40))
    with pytest.raises(ValueError, match="sample count"):
        algo.aggregate(ServerState(6, {"selector-0": _w(1)}), replies, round_=6)


def test_fewer_clients_than_min_clients_is_an_error_before_round_zero():
    cfg = FederatedConfig(clients_per_round=3, min_clients=3)
    with pytest.raises(
        ValueError, match=r"only 2 clients can train \(a, b\), fewer than federated.min_clients=3"
    ):
        Algorithm(cfg, ["a", "b"], 0)
    assert Algorithm(cfg, ["a", "b", "c"], 0).clients == ["a", "b", "c"]


def _three_groups(seed: int):
    """Six clients in three groups pulling in three directions (client i in group i % 3), and the selectors'
    moves: selector-0 toward group 2, selector-1 toward group 0, selector-2 toward group 1 (each selector minus
    the selectors' mean, as the round loop computes it)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pulls = rng.normal(size=(3, 40))
    deltas = {f"c{i}": pulls[i % 3] + 0.2 * rng.normal(size=40) for i in range(6)}
    centre = pulls.mean(0)
    return deltas, {f"selector-{s}": pulls[(s + 2) % 3] - centre for s in range(3)}


def test_grouping_by_updates_gives_each_cluster_the_selector_that_moved_toward_it():
    algo = _algo(fb={"grouping": "updates"})  # 6 clients, 3 selectors
    deltas, moved = _three_groups(seed=0)
    clusters, margins = algo.group_by_updates(deltas, moved, round_=6)
    serves = {0: "selector-1", 1: "selector-2", 2: "selector-0"}
    assert clusters == {f"c{i}": serves[i % 3] for i in range(6)}
    assert set(margins) == set(deltas) and all(m > 0.3 for m in margins.values())


def test_a_regrouping_keeps_each_group_on_the_selector_it_trained():
    """The same clusters found again keep their selectors, whatever direction the selectors have moved in."""
    algo = _algo(fb={"grouping": "gradients"})
    deltas, moved = _three_groups(seed=1)
    before = {f"c{i}": f"selector-{i % 3}" for i in range(6)}  # group t trained selector-t
    clusters, _ = algo.group_by_updates(deltas, moved, round_=10, previous=before)
    assert clusters == before
    # one client moved to another group keeps the majority's mapping for the rest
    clusters, _ = algo.group_by_updates(deltas, moved, round_=10, previous={**before, "c0": "selector-2"})
    assert clusters == before
