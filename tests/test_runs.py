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


def test_resume_may_extend_the_rounds_unless_a_schedule_decays_over_them(tmp_path):
    import pytest

    from fedbiscuit.config import config_from_dict
    from fedbiscuit.runs import RunExistsError

    def cfg(rounds, schedule):
        raw = {"name": "r", "output_dir": str(tmp_path), "pipeline": "federated"}
        return config_from_dict({**raw, "federated": {"rounds": rounds}, "train": {"schedule": schedule}})

    for schedule in ("constant", "cosine"):
        RunDir(cfg(10, schedule), overwrite=True).close()
        if schedule == "constant":
            RunDir(cfg(20, schedule), resume=True).close()  # a longer run computes the same first rounds
        else:  # the cosine over 10 x local_steps would become one over 20: the finished rounds' rates change
            with pytest.raises(RunExistsError, match=r"federated.rounds \(10 -> 20\)"):
                RunDir(cfg(20, schedule), resume=True)


def test_the_oracle_needs_groups_of_clients():
    import pytest

    from fedbiscuit.config import FederatedConfig
    from fedbiscuit.federated.algorithm import Algorithm

    with pytest.raises(ValueError, match=r"every client is its own group"):
        Algorithm(FederatedConfig(algorithm="oracle"), ["a", "b", "c"], 0)
