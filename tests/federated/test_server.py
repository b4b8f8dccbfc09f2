import pytest
import torch

from fedbiscuit.federated.client import ScoreReply, TrainReply
from fedbiscuit.federated.server import aggregate, delta_update, fedavg, reject_reason, sample_clients


def _state(v):
    return {"a": torch.full((2, 2), float(v)), "b": torch.full((3,), float(v) * 2)}


def test_fedavg_uniform_and_weighted_by_hand():
    states = [_state(1), _state(2), _state(6)]
    assert torch.equal(fedavg(states)["a"], torch.full((2, 2), 3.0))
    w = fedavg(states, [1, 1, 2])
    assert torch.allclose(w["a"], torch.full((2, 2), (1 + 2 + 12) / 4))
    assert w["a"].dtype == torch.float32
    with pytest.raises(ValueError):
        fedavg([])


def test_paper_delta_update_by_hand():
    g = _state(1)
    out = delta_update(g, [_state(3), _state(5)], [1 / 8, 1 / 8])
    assert torch.allclose(out["a"], torch.full((2, 2), 1 + (2 + 4) / 8))
    assert torch.allclose(out["b"], torch.full((3,), 2 + (4 + 8) / 8))
    replies = [TrainReply(_state(3), 10), TrainReply(_state(5), 30)]
    uniform = aggregate(g, replies, "uniform", "paper", num_clients=8)
    assert torch.allclose(uniform["a"], torch.full((2, 2), 1 + (2 + 4) / 8))
    # weighted by samples: each delta times its samples over all clients' samples (here 120)
    weighted = aggregate(g, replies, "samples", "paper", num_clients=8, total_samples=120)
    assert torch.allclose(weighted["a"], torch.full((2, 2), 1 + (10 * 2 + 30 * 4) / 120))
    with pytest.raises(ValueError, match="every client's sample count"):
        aggregate(g, replies, "samples", "paper", num_clients=8)


def test_aggregate_weighting_by_samples():
    replies = [TrainReply(_state(0), 1), TrainReply(_state(4), 3)]
    assert torch.allclose(aggregate(_state(9), replies, "samples")["a"], torch.full((2, 2), 3.0))
    assert torch.allclose(aggregate(_state(9), replies, "uniform")["a"], torch.full((2, 2), 2.0))


def test_sampling_is_uniform_without_replacement_and_replayable():
    names = [f"c{i}" for i in range(10)]
    picks = [sample_clients(names, 4, seed=0, round_=r) for r in range(200)]
    assert all(len(set(p)) == 4 for p in picks)
    assert picks == [sample_clients(names, 4, seed=0, round_=r) for r in range(200)]
    counts = {n: sum(n in p for p in picks) for n in names}
    assert min(counts.values()) > 50 and max(counts.values()) < 110  # 80 expected each
    assert sample_clients(names, 20, 0, 0) == names


def test_reject_reasons():
    ref = _state(0)
    assert reject_reason(TrainReply(_state(1), 5, {"loss": 0.5}), ref) is None
    nan = _state(1)
    nan["a"][0, 0] = float("nan")
    assert "non-finite" in reject_reason(TrainReply(nan, 5), ref)
    assert "shape" in reject_reason(TrainReply({"a": torch.zeros(2, 3), "b": torch.zeros(3)}, 5), ref)
    assert "missing b" in reject_reason(TrainReply({"a": torch.zeros(2, 2)}, 5), ref)
    assert "sample count" in reject_reason(TrainReply(_state(1), 0), ref)
    assert "non-finite training loss" in reject_reason(TrainReply(_state(1), 5, {"loss": float("nan")}), ref)
    assert reject_reason(TrainReply(_state(1), 5, {"loss": 0.3, "accuracy": float("nan")}), ref) is None
    assert "not a training reply" in reject_reason(ScoreReply({}, 1), ref)
