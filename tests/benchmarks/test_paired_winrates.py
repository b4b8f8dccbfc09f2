"""benchmarks/paired_winrates.py on phase-2 run folders whose win-rate records come from rlhf.evaluation.win_rate
with a judge that prefers longer answers: each policy's verdicts are planted by its answers' lengths."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from scipy.stats import binomtest

from fedbiscuit.rlhf.evaluation import win_rate

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "paired_winrates.py"
PROMPTS = [f"prompt {i}" for i in range(20)]


class LengthJudge:
    name = "length"

    def prefer(self, prompts, first, second):
        pairs = zip(first, second, strict=True)
        return [1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5 for a, b in pairs]


def _run(folder: Path, name: str, wins: int, prompts=PROMPTS, initial_wins: int | None = None) -> str:
    """A finished phase-2 run whose tuned policy beats the reference on its first `wins` prompts (and the initial
    policy's second sample on its first `initial_wins`; default: as the tuned policy)."""

    def judged(first: int) -> dict:  # the answer on each of the first `first` prompts is the longer one
        answers = ["long answer" if i < first else "s" for i in range(len(prompts))]
        return win_rate(LengthJudge(), prompts, answers, ["mid"] * len(prompts))

    rec, initial = judged(wins), judged(wins if initial_wins is None else initial_wins)
    run = folder / name
    run.mkdir()
    records = [{"event": "winrate", "label": "initial policy", **initial}]
    records.append({"event": "winrate", "label": "tuned policy", "mean_new_tokens": 9.0, **rec})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(run)


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_win_rates_and_paired_differences_by_prompt(tmp_path):
    a0, a1 = _run(tmp_path, "dpo_a_s0", 16), _run(tmp_path, "dpo_a_s1", 14)
    b0, b1 = _run(tmp_path, "dpo_b_s0", 20), _run(tmp_path, "dpo_b_s1", 20)
    out = tmp_path / "out.json"
    done = _script(a0, "--compare", a0, b0, "--compare", a1, b1, "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    run = result["runs"][a0]
    assert (run["wins"], run["losses"], run["win_rate"]) == (16, 4, 0.8)
    assert run["sign_p"] == pytest.approx(binomtest(16, 20, 0.5).pvalue)
    assert 0.5 < run["ci95"][0] < 0.8 < run["ci95"][1] <= 1.0
    first, second = result["comparisons"]
    assert first["difference"] == pytest.approx(0.2) and (first["gained"], first["lost"]) == (4, 0)
    assert second["difference"] == pytest.approx(0.3) and first["n"] == 20
    (pool,) = result["pools"]
    assert (pool["baseline"], pool["other"], pool["seeds"]) == ("dpo_a", "dpo_b", 2)
    assert pool["difference"] == pytest.approx(0.25)  # per prompt, the mean over the seeds


def test_runs_on_other_prompts_are_refused(tmp_path):
    a = _run(tmp_path, "a_s0", 10)
    b = _run(tmp_path, "b_s0", 10, prompts=[f"other {i}" for i in range(20)])
    done = _script("--compare", a, b)
    assert done.returncode != 0 and "not judged on the same prompts (0 shared" in done.stderr
    (tmp_path / "empty").mkdir()
    done = _script(str(tmp_path / "empty"))
    assert done.returncode != 0 and "no metrics.jsonl" in done.stderr


def test_the_tuned_policy_against_the_initial_policys_own_sample_paired_per_prompt(tmp_path):
    run = _run(tmp_path, "dpo_a_s0", 16, initial_wins=10)
    out = tmp_path / "out.json"
    done = _script(run, "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    c = json.loads(out.read_text())["runs"][run]["tuned_minus_initial"]
    assert c["difference"] == pytest.approx(0.3) and (c["gained"], c["lost"], c["n"]) == (6, 0, 20)
    assert c["mcnemar_p"] == pytest.approx(binomtest(6, 6, 0.5).pvalue)
    assert "tuned - initial policy, paired per prompt: +30.0" in done.stdout
