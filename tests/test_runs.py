import os

import torch

from fedbiscuit.config import RunConfig
from fedbiscuit.runs import RunDir


def test_deterministic_runs_fix_the_kernels_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        RunDir(RunConfig(name="det", output_dir=str(tmp_path), deterministic=True)).close()
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        # the next run in the same process gets what its own config says
        RunDir(RunConfig(name="fast", output_dir=str(tmp_path))).close()
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
