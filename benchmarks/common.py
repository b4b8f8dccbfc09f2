"""What the benchmark scripts share: the command line of a script driven by a config, the JSON they leave
behind, and one measured variant per process (so each variant's peak RSS is its own)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # the scripts run from a checkout, installed or not
    sys.path.insert(0, str(ROOT / "src"))


def config_parser(doc: str) -> argparse.ArgumentParser:
    """CONFIG [key=value ...] [--json FILE], with the script's docstring as its help."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    p.add_argument("--json", help="write the figures here too")
    return p


def write_json(path: str | None, obj) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=1))


def run_variant(script: str, variant: str, argv: list[str]) -> dict:
    """``script --variant VARIANT *argv`` in a fresh process; its last line of output is the row, as JSON."""
    out = subprocess.run(
        [sys.executable, script, "--variant", variant, *argv], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
    print(f"{variant}: done", file=sys.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def hh_cached_config(data: str, top_layers: int = 4) -> dict:
    """The cached path as the HH configs set it (SmolLM2, LoRA r=16 on q/k/v/o of the top blocks, bf16 where the
    CPU has it, max_length 256), every HH subset, an empty trunk store of its own: for speed benchmarks."""
    import tempfile

    qkvo = ["q_proj", "k_proj", "v_proj", "o_proj"]
    return {
        "data": {"source": "hh_rlhf", "root": data, "heldout_fraction": 0.0},
        "model": {
            "name_or_path": "embedded",
            "device": "cpu",
            "dtype": "auto",
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "top_layers": top_layers, "target_modules": qkvo},
        },
        "selector": {"max_length": 256, "path": "cached", "cache_dir": tempfile.mkdtemp(prefix="trunk-")},
    }
