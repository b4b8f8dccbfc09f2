import pytest
import torch

from fedbiscuit.config import LoraSettings
from fedbiscuit.models.adapters import (
    AdapterMismatchError,
    adapter_state,
    add_adapter,
    load_adapter_state,
    read_adapter,
    save_adapter,
)

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)


def _perturbed(state, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


def test_named_adapters_share_one_base(tiny):
    model, _ = tiny
    base_params = sum(p.numel() for p in model.parameters())
    model = add_adapter(model, "s0", LORA, seed=0)
    model = add_adapter(model, "s1", LORA, seed=1)
    s0, s1 = adapter_state(model, "s0"), adapter_state(model, "s1")
    assert s0.keys() == s1.keys() and len(s0) == 8  # q,v x A,B x 2 layers
    assert not torch.equal(s0[next(k for k in s0 if "lora_A" in k)], s1[next(k for k in s1 if "lora_A" in k)])
    lora_params = sum(v.numel() for v in s0.values()) * 2
    assert sum(p.numel() for p in model.parameters()) == base_params + lora_params
    assert all(
        "s0" not in k and "s1" not in k for k in s0
    )  # names carry no adapter name: any slot can load them
    with pytest.raises(ValueError, match="already exists"):
        add_adapter(model, "s0", LORA)


def test_state_roundtrip_changes_outputs(tiny, tmp_path):
    model, _ = tiny
    model = add_adapter(model, "s0", LORA, seed=0)
    ids = torch.tensor([[5, 6, 7, 8]])
    before = model(input_ids=ids).logits
    new = _perturbed(adapter_state(model, "s0"))
    save_adapter(new, tmp_path / "a.safetensors", {"round": "3"})
    loaded, meta = read_adapter(tmp_path / "a.safetensors")
    assert meta == {"round": "3"}
    load_adapter_state(model, "s0", loaded)
    assert all(torch.equal(adapter_state(model, "s0")[k], new[k]) for k in new)
    assert not torch.allclose(model(input_ids=ids).logits, before)
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left behind


def test_adapter_state_is_a_copy(tiny):
    model, _ = tiny
    model = add_adapter(model, "s0", LORA, seed=0)
    state = adapter_state(model, "s0")
    k = next(iter(state))
    state[k].add_(1.0)
    assert not torch.equal(adapter_state(model, "s0")[k], state[k])


def test_mismatches_are_all_reported(tiny):
    model, _ = tiny
    model = add_adapter(model, "s0", LORA, seed=0)
    good = adapter_state(model, "s0")
    keys = sorted(good)
    bad = dict(good)
    del bad[keys[0]]
    bad["extra.weight"] = torch.zeros(2)
    bad[keys[1]] = torch.zeros(3, 3)
    bad[keys[2]] = good[keys[2]].double()
    bad[keys[3]] = torch.full_like(good[keys[3]], float("nan"))
    with pytest.raises(AdapterMismatchError) as err:
        load_adapter_state(model, "s0", bad, where="upload from client-3")
    msg = str(err.value)
    assert "upload from client-3" in msg and "5 problems" in msg
    for needle in (
        f"missing {keys[0]}",
        "unexpected extra.weight",
        "shape (3, 3)",
        "dtype torch.float64",
        "non-finite",
    ):
        assert needle in msg
    assert all(torch.equal(adapter_state(model, "s0")[k], good[k]) for k in good)  # nothing half-applied


def test_unreadable_file(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterMismatchError, match="x.safetensors"):
        read_adapter(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError):
        read_adapter(tmp_path / "none.safetensors")


def test_bad_target_modules_are_named(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="target_modules"):
        add_adapter(model, "s0", LoraSettings(target_modules=["nope_proj"]))
