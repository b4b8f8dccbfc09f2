"""Synthetic clients with planted, opposite preferences: for tests, benchmarks and dry runs without data."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ["apple", "river", "stone", "cloud", "green", "seven", "table", "light"]


def planted_rows(clients: int = 8, pairs: int = 24, noise: float = 0.0) -> list[dict]:
    """Even-numbered clients prefer the answer 'yes', odd-numbered ones 'no' (chosen/rejected layout).

    With ``noise`` > 0 that share of each client's judgments (every 1/noise-th pair) goes the other way.
    """
    rows = []
    flip_every = round(1 / noise) if noise > 0 else 0
    for c in range(clients):
        for i in range(pairs):
            prompt = f"{WORDS[i % 8]} {WORDS[(i // 8 + c) % 8]} {i} {c}?"
            likes_yes = (c % 2 == 0) != bool(flip_every and (i + c) % flip_every == 0)
            liked, other = ("yes", "no") if likes_yes else ("no", "yes")
            rows.append({"prompt": prompt, "chosen": liked, "rejected": other, "client": f"client-{c}"})
    return rows


def write_planted(
    folder: Path, clients: int = 8, pairs: int = 24, noise: float = 0.0, test_pairs: int = 0
) -> Path:
    """train.jsonl and test.jsonl in ``folder``, readable with data.source=generic.

    ``test_pairs`` = 0: the test split is the training pairs themselves (enough to see a planted preference
    learned at all). > 0: each client's test split is that many pairs on prompts it never trained on, so a
    figure on it tells generalising from memorising."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = planted_rows(clients, pairs + test_pairs, noise)  # client by client, prompts numbered within each
    per = pairs + test_pairs
    train = [r for k, r in enumerate(rows) if k % per < pairs]
    test = [r for k, r in enumerate(rows) if k % per >= pairs] if test_pairs else train
    for split, chosen in (("train", train), ("test", test)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen))
    return folder


def planted_run_config(
    folder: Path,
    name: str,
    *,
    seed: int = 0,
    lr: float = 1e-2,
    noise: float = 0.0,
    clients: int = 8,
    test_pairs: int = 0,
    **federated,
) -> dict:
    """A raw federated run config on planted data with the tiny model: writes ``folder/data`` and runs into
    ``folder/runs``. ``federated`` keys override the defaults (a 3-round FedBis of 3 clients x 2 steps)."""
    write_planted(folder / "data", clients=clients, noise=noise, test_pairs=test_pairs)
    return {
        "name": name,
        "output_dir": str(folder / "runs"),
        "seed": seed,
        "pipeline": "federated",
        "data": {
            "source": "generic",
            "root": str(folder / "data"),
            "columns": {"client": "client"},
            "heldout_fraction": 0.25,
            "max_eval_pairs_per_client": 6,
        },
        "model": {"name_or_path": "tiny", "device": "cpu", "lora": {"r": 4, "alpha": 8, "dropout": 0.05}},
        "selector": {"template": "Q:{prompt}\nA:{response_a}\nB:{response_b}\nAnswer:", "max_length": 64},
        "train": {"lr": lr, "batch_size": 4},
        "eval": {"batch_size": 16, "before_training": False},
        "federated": {
            "algorithm": "fedbis",
            "rounds": 3,
            "clients_per_round": 3,
            "local_steps": 2,
            "eval_every": 100,
            "checkpoint_every": 1,
            **federated,
        },
    }
