"""Turning loaded pairs into clients: natural ids, IID or Dirichlet (flwr-datasets), held-out slices, and the
clients held out of training altogether (unseen)."""

from __future__ import annotations

import warnings
from collections import defaultdict

from ..config import PartitionConfig
from .pairs import Comparison, DataError, LoadReport, prompt_hash, unit_hash

MERGED = "merged-small"


def _by_client(pairs: list[Comparison]) -> dict[str, list[Comparison]]:
    out: dict[str, list[Comparison]] = defaultdict(list)
    for p in pairs:
        out[p.client].append(p)
    return dict(sorted(out.items()))


def natural_client_namer(train_pairs: list[Comparison], cfg: PartitionConfig, report: LoadReport):
    """A function (natural id, prompt) -> client name, shared by the train and evaluation splits.

    Small natural ids are merged (never dropped) and, with ``split_each`` > 1, every id is cut into parts by a
    hash of the prompt, so a prompt always lands in the same part in every split.
    """
    sizes = defaultdict(int)
    for p in train_pairs:
        sizes[p.client] += 1
    small = {c for c, n in sizes.items() if n < cfg.merge_below}
    if small:
        report.notes.append(
            f"merged {len(small)} natural clients with fewer than {cfg.merge_below} pairs "
            f"({sum(sizes[c] for c in small)} pairs) into client {MERGED!r}"
        )

    def name(natural: str, prompt: str) -> str:
        base = MERGED if natural in small else natural
        if cfg.split_each == 1:
            return base
        return f"{base}#{prompt_hash('part:' + prompt) % cfg.split_each}"

    return name


def _flwr_partition(pairs: list[Comparison], cfg: PartitionConfig, seed: int) -> dict[str, list[Comparison]]:
    """IID or Dirichlet over prompts (an SHP post, a TL;DR post, a dialogue), not over pairs: as in the
    reference, each prompt goes to one client and all its comparisons follow it, so one post's comparisons never
    sit on two clients. A prompt's natural id (for Dirichlet) is that of its first pair."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    by_prompt: dict[str, list[Comparison]] = {}
    for p in pairs:
        by_prompt.setdefault(p.prompt, []).append(p)
    units = list(by_prompt.values())
    ds = Dataset.from_dict({"idx": list(range(len(units))), "natural": [u[0].client for u in units]})
    n = cfg.num_clients
    if n > len(units):
        raise ValueError(f"partition.num_clients={n} exceeds the {len(units)} distinct prompts loaded")
    if cfg.method == "iid":
        part = IidPartitioner(num_partitions=n)
    else:
        part = DirichletPartitioner(
            num_partitions=n,
            partition_by="natural",
            alpha=cfg.alpha,
            min_partition_size=cfg.min_partition_size,  # in prompts
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    part.dataset = ds
    width = len(str(n - 1))
    try:
        with (
            warnings.catch_warnings()
        ):  # flwr-datasets warns on every resampling; the error below says it all
            warnings.filterwarnings("ignore", "The specified min_partition_size", UserWarning)
            indices = [part.load_partition(i)["idx"] for i in range(n)]
    except ValueError as err:
        if cfg.method != "dirichlet":
            raise
        raise ValueError(
            f"partition: a Dirichlet draw with alpha={cfg.alpha} over {len(set(ds['natural']))} natural ids did "
            f"not give each of the {n} clients at least min_partition_size={cfg.min_partition_size} prompts "
            f"(flwr-datasets: {err}). Raise partition.alpha, lower partition.num_clients, or set "
            "partition.min_partition_size=0 (empty clients are then skipped and counted)"
        ) from err
    return {f"partition-{i:0{width}d}": [p for j in idx for p in units[j]] for i, idx in enumerate(indices)}


def partition(
    pairs: list[Comparison], cfg: PartitionConfig, seed: int, report: LoadReport
) -> tuple[dict[str, list[Comparison]], object]:
    """Clients for the training split, and the namer that assigns evaluation pairs to the same natural clients."""
    namer = natural_client_namer(pairs, cfg, report)
    if cfg.method == "natural":
        clients: dict[str, list[Comparison]] = defaultdict(list)
        for p in pairs:
            clients[namer(p.client, p.prompt)].append(p)
        return dict(sorted(clients.items())), namer
    clients = _flwr_partition(pairs, cfg, seed)
    report.notes.append(
        f"{cfg.method} partition of the prompts into {cfg.num_clients} clients"
        + (f" (alpha={cfg.alpha} over natural ids)" if cfg.method == "dirichlet" else "")
        + "; a prompt's pairs stay together; evaluation pairs stay grouped by natural id"
    )
    return clients, namer


def heldout_split(pairs: list[Comparison], fraction: float) -> tuple[list[Comparison], list[Comparison]]:
    """(train, held-out) by a hash of the prompt: a pair and its swapped copy can never sit on both sides."""
    train, held = [], []
    for p in pairs:
        (held if unit_hash(p.prompt, "heldout:") < fraction else train).append(p)
    return train, held


def cap(pairs: list[Comparison], limit: int | None) -> list[Comparison]:
    """At most ``limit`` pairs, chosen by prompt hash so the choice is the same on every machine and run."""
    return cap_split(pairs, limit)[0]


def cap_split(pairs: list[Comparison], limit: int | None) -> tuple[list[Comparison], list[Comparison]]:
    """(the ``limit`` pairs ``cap`` keeps, the rest in the same hash order, less any pair whose prompt the kept
    pairs have: a prompt's pairs can straddle the cut, and the rest must share no prompt with what trains)."""
    if limit is None or len(pairs) <= limit:
        return pairs, []
    ordered = sorted(pairs, key=lambda p: (unit_hash(p.prompt, "cap:"), p.uid))
    kept = ordered[:limit]
    seen = {p.prompt for p in kept}
    return kept, [p for p in ordered[limit:] if p.prompt not in seen]


def choose_unseen(names: list[str], spec: list[str] | float, seed: int) -> list[str]:
    """The clients held out of training (``data.unseen_clients``), in the order of ``names``.

    A list names them. A share picks round(share * n) clients, at least one, with the lowest hash of
    (seed, name): the choice depends on the names and the seed only, not on their order or on the data.
    At least one client must be left to train.
    """
    if isinstance(spec, list):
        unknown = [c for c in spec if c not in names]
        if unknown:
            shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
            raise DataError(
                "data.unseen_clients",
                f"unknown client(s) {', '.join(map(repr, unknown))}; the clients after partitioning are: {shown}",
            )
        chosen = set(spec)
    else:
        k = max(1, int(spec * len(names) + 0.5))  # half rounds up, not to even
        chosen = set(sorted(names, key=lambda c: (unit_hash(c, f"unseen:{seed}:"), c))[:k])
    if len(chosen) >= len(names):
        raise DataError(
            "data.unseen_clients",
            f"{spec!r} holds out all {len(names)} clients; at least one must be left to train",
        )
    return [c for c in names if c in chosen]


def unseen_split(
    own: list[Comparison], evaluation: list[Comparison], fraction: float, eval_cap: int | None
) -> tuple[list[Comparison], list[Comparison]]:
    """(labelled slice, remaining pairs) of an unseen client.

    The labelled slice is its held-out slice by the usual prompt-hash rule: the only labels it offers to
    choose (or fine-tune) a selector. The remaining pairs are everything else it has, from both splits, with
    no prompt of the slice (the slice's answers must not be graded again) and no exact duplicate, capped like
    evaluation pairs (``max_eval_pairs_per_client``).
    """
    rest, labelled = heldout_split(own, fraction)
    taken = {p.prompt for p in labelled}
    remaining, seen = [], set()
    for p in rest + evaluation:
        key = (p.prompt, p.response_a, p.response_b, p.label)
        if p.prompt not in taken and key not in seen:
            seen.add(key)
            remaining.append(p)
    return labelled, cap(remaining, eval_cap)
