"""Shared fixtures: the real data folder (beside the project), tiny models, upstream-format fixture writers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Tiny models gain nothing from a second thread, and one thread keeps the suite steady on a busy 2-core box.
torch.set_num_threads(1)


def shared_data_dir() -> Path | None:
    env = os.environ.get("FEDBISCUIT_DATA_DIR")
    path = Path(env) if env else ROOT.parent / "shared" / "data"
    return path if (path / "hh-rlhf").is_dir() else None


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real preference data; absent in CI is a failure, not a skip (the tests would silently vanish)."""
    path = shared_data_dir()
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(
                "real data not found: expected ../shared/data beside the project or FEDBISCUIT_DATA_DIR"
            )
        pytest.skip("real data not available (set FEDBISCUIT_DATA_DIR)")
    return path


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    # Tests must not pick up the developer's data dir or cache by accident; real-data tests pass paths explicitly.
    monkeypatch.delenv("FEDBISCUIT_DATA_DIR", raising=False)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def smollm_enabled() -> bool:
    return os.environ.get("FEDBISCUIT_TEST_SMOLLM") == "1"


@pytest.fixture
def tiny():
    """(model, tokenizer): a fresh tiny random Llama for each test.

    With FEDBISCUIT_TEST_SMOLLM=1 the same tests run on the real SmolLM2-135M-Instruct instead (slow).
    """
    if smollm_enabled():
        from fedbiscuit.config import ModelConfig
        from fedbiscuit.models.loading import load_model

        return load_model(ModelConfig(device="cpu"))
    from fedbiscuit.models.tiny import tiny_model

    return tiny_model(seed=0)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real chat tokenizer of the embedded SmolLM2-135M-Instruct, read from its GGUF (a few seconds, no
    model weights). Session-wide: copy it (copy.deepcopy) before changing it."""
    from transformers import AutoTokenizer

    from fedbiscuit.models.loading import embedded_gguf

    path = embedded_gguf()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
