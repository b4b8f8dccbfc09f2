"""LoRA adapters through peft: several named adapters on one base, and an adapter's state as flat tensors.

The flat state (name -> tensor, names without the adapter's own name) is exactly what a client uploads and
what the server averages. Loading checks names, shapes and dtypes and reports every mismatch at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import LoraSettings
from ..durable import durable_write

AdapterState = dict[str, torch.Tensor]


class AdapterMismatchError(ValueError):
    pass


def num_decoder_layers(model) -> int:
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    n = getattr(base.config, "num_hidden_layers", None)
    if n is None:  # multimodal configs keep the text model's settings one level down
        n = getattr(base.config.get_text_config(), "num_hidden_layers", None)
    if n is None:
        raise ValueError(
            f"cannot tell how many decoder blocks {type(base).__name__} has (no num_hidden_layers)"
        )
    return int(n)


def top_layer_indices(cfg: LoraSettings, num_layers: int) -> list[int] | None:
    """The blocks LoRA goes into: the last ``cfg.top_layers``, or None for all of them."""
    if cfg.top_layers is None:
        return None
    if cfg.top_layers > num_layers:
        raise ValueError(f"model.lora.top_layers={cfg.top_layers} but the model has only {num_layers} blocks")
    return list(range(num_layers - cfg.top_layers, num_layers))


def lora_config(cfg: LoraSettings, num_layers: int | None = None) -> LoraConfig:
    layers = top_layer_indices(cfg, num_layers) if cfg.top_layers is not None and num_layers else None
    if cfg.top_layers is not None and layers is None:
        raise ValueError("model.lora.top_layers needs the model's number of blocks")
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        layers_to_transform=layers,
        bias="none",
        task_type="CAUSAL_LM",
    )


def add_adapter(model, name: str, cfg: LoraSettings, seed: int | None = None) -> PeftModel:
    """Add a LoRA adapter ``name`` (wrapping the model in peft the first time) and make it active.

    With ``seed`` the adapter's initial weights depend only on the seed, not on how many adapters came before.
    """
    training = model.training
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if isinstance(model, PeftModel):
            if name in model.peft_config:
                raise ValueError(f"adapter {name!r} already exists")
            model.add_adapter(name, lora_config(cfg, num_decoder_layers(model)))
        else:
            try:
                model = get_peft_model(model, lora_config(cfg, num_decoder_layers(model)), adapter_name=name)
            except ValueError as err:
                raise ValueError(f"model.lora.target_modules={list(cfg.target_modules)}: {err}") from None
    model.set_adapter(name)
    model.train(training)  # new LoRA dropout modules start in training mode; keep the model's mode
    return model


def _live_state(model: PeftModel, name: str) -> AdapterState:
    # get_peft_model_state_dict returns the parameters' own tensors (views), so writing into them sets the adapter.
    return get_peft_model_state_dict(model, adapter_name=name)


def adapter_state(model: PeftModel, name: str) -> AdapterState:
    """A detached CPU copy of adapter ``name``'s tensors: what leaves a client."""
    return {k: v.detach().to("cpu", copy=True) for k, v in _live_state(model, name).items()}


def check_state(expected: AdapterState, state: AdapterState, where: str = "adapter state") -> None:
    """Raise AdapterMismatchError listing every missing, unexpected, mis-shaped or non-finite tensor."""
    problems = [f"missing {k}" for k in sorted(expected.keys() - state.keys())]
    problems += [f"unexpected {k}" for k in sorted(state.keys() - expected.keys())]
    for k in sorted(expected.keys() & state.keys()):
        want, got = expected[k], state[k]
        if not isinstance(got, torch.Tensor):
            problems.append(f"{k}: not a tensor ({type(got).__name__})")
            continue
        if tuple(got.shape) != tuple(want.shape):
            problems.append(f"{k}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        if got.dtype != want.dtype:
            problems.append(f"{k}: dtype {got.dtype}, expected {want.dtype}")
        elif got.is_floating_point() and not torch.isfinite(got).all():
            problems.append(f"{k}: non-finite values")
    if problems:
        raise AdapterMismatchError(
            f"{where} does not fit the adapter ({len(problems)} problems): " + "; ".join(problems)
        )


@torch.no_grad()
def load_adapter_state(
    model: PeftModel, name: str, state: AdapterState, where: str = "adapter state"
) -> None:
    """Copy ``state`` into adapter ``name`` in place, after checking it fits."""
    live = _live_state(model, name)
    check_state(live, state, where)
    for k, v in live.items():
        v.copy_(state[k])


def save_adapter(state: AdapterState, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file durably (temp file, fsync, rename, fsync the folder): neither a crash nor a
    power loss leaves a torn file."""
    with durable_write(path, suffix=".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)


def read_adapter(path: str | Path) -> tuple[AdapterState, dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})  # noqa: SIM118 (not a dict)
    except Exception as err:  # safetensors raises its own error types for a torn or foreign file
        raise AdapterMismatchError(f"{path}: not a readable safetensors file ({err})") from None


def lora_metadata(cfg: LoraSettings) -> dict[str, str]:
    return {"lora": json.dumps(cfg.model_dump())}
