"""benchmarks/adam_noise.py on the tiny model and planted clients: per-pair gradients give each batch size's
signal per AdamW step, relative to a batch of 8."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from fedbiscuit.data.synthetic import planted_run_config

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "adam_noise.py"


def test_signal_per_step_grows_with_the_batch_and_noise_share_falls(tmp_path):
    config = tmp_path / "planted.yaml"
    config.write_text(yaml.safe_dump(planted_run_config(tmp_path, "noise", noise=0.3)))
    out = tmp_path / "noise.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(config), "--pairs", "24", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "FEDBISCUIT_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["pairs"] == 24
    rows = {r["batch"]: r for r in result["rows"]}
    assert rows[8]["progress_vs_8"] == 1.0
    progress = [rows[b]["progress_vs_8"] for b in (1, 2, 4, 8, 16)]
    noise = [rows[b]["noise_dominated"] for b in (1, 2, 4, 8, 16)]
    assert all(
        a < b for a, b in zip(progress, progress[1:], strict=False)
    )  # a bigger batch, more signal per step
    assert all(a >= b for a, b in zip(noise, noise[1:], strict=False))
    # a batch of 1 can carry at most sqrt(8) times less than a batch of 8 (all noise), never more
    assert 1 / 8**0.5 - 1e-9 <= progress[0] < 1.0
