from fedbiscuit.config import FedBiscuitConfig, FederatedConfig
from fedbiscuit.federated.algorithm import Algorithm
from fedbiscuit.federated.checkpoint import ServerState


def _algo(**kw):
    fb = FedBiscuitConfig(num_selectors=3, warmup_rounds=2, regroup_every=4)
    cfg = FederatedConfig(algorithm="fedbiscuit", clients_per_round=2, fedbiscuit=fb, **kw)
    return Algorithm(cfg, [f"c{i}" for i in range(6)], seed=0)


def test_warmup_trains_selectors_in_turn_then_clusters():
    algo = _algo()
    state = ServerState(0, {s: {} for s in algo.selectors})
    warm = [set(algo.plan(state, r).values()) for r in range(6)]
    assert warm == [{"selector-0"}] * 2 + [{"selector-1"}] * 2 + [{"selector-2"}] * 2
    assert [r for r in range(20) if algo.regroup_due(r)] == [6, 10, 14, 18]
    state.clusters = {f"c{i}": f"selector-{i % 3}" for i in range(6)}
    plan = algo.plan(state, 7)
    assert len(plan) == 2 and all(sel == state.clusters[c] for c, sel in plan.items())


def test_local_and_fedbis_selectors():
    local = Algorithm(FederatedConfig(algorithm="local", clients_per_round=3), ["a", "b", "c", "d"], 0)
    assert local.selectors == ["a", "b", "c", "d"]
    assert all(c == s for c, s in local.plan(ServerState(0, {}), 0).items())
    fedbis = Algorithm(FederatedConfig(algorithm="fedbis", clients_per_round=3), ["a", "b", "c", "d"], 0)
    assert fedbis.selectors == ["selector-0"] and not fedbis.regroup_due(100)


def test_group_returns_balanced_clusters():
    algo = _algo()
    losses = {f"c{i}": {f"selector-{k}": float(k != i % 3) for k in range(3)} for i in range(6)}
    assert algo.group(losses, 6) == {f"c{i}": f"selector-{i % 3}" for i in range(6)}
