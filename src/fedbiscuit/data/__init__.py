"""Preference data: load a config's pairs, partition them into clients, and report what was dropped."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from .pairs import Comparison, DataError, LoadReport
from .partition import cap, cap_split, choose_unseen, heldout_split, partition, unseen_split
from .sources import load_split

__all__ = ["ClientData", "Comparison", "DataError", "FederatedData", "LoadReport", "prepare_data"]


@dataclass
class ClientData:
    """A client's pairs. An unseen client (held out of training) has no ``train``; its ``heldout`` is its
    labelled slice and its ``test`` everything else it has (partition.unseen_split)."""

    name: str
    train: list[Comparison]
    heldout: list[Comparison]  # by prompt hash; for grouping scores and validation
    test: list[Comparison] = field(default_factory=list)  # from the evaluation split, same natural client
    # training-split pairs that data.max_train_pairs_per_client left out, in the cap's order: neither training
    # nor grouping reads them, so settings can be chosen on them (benchmarks/paired_runs.py --split spare)
    spare: list[Comparison] = field(default_factory=list)


@dataclass
class FederatedData:
    clients: dict[str, ClientData]
    report: LoadReport
    eval_report: LoadReport | None
    eval_only: dict[str, list[Comparison]] = field(default_factory=dict)  # eval clients with no train data
    unseen: dict[str, ClientData] = field(default_factory=dict)  # held out of training (data.unseen_clients)

    def all_train(self) -> list[Comparison]:
        return [p for c in self.clients.values() for p in c.train]

    def all_test(self) -> dict[str, list[Comparison]]:
        out = {name: c.test for name, c in self.clients.items() if c.test}
        out.update(self.eval_only)
        return out


def prepare_data(cfg, seed: int = 0) -> FederatedData:
    """Everything a run needs from ``cfg.data`` (a RunConfig's data section)."""
    pairs, report = load_split(cfg, cfg.train_split)
    if not pairs:
        raise DataError(cfg.train_split, "no usable pairs were loaded (see the drop counts)")
    groups, namer = partition(pairs, cfg.partition, seed, report)
    unseen_names: list[str] = []
    if cfg.unseen_clients is not None:
        unseen_names = choose_unseen([n for n, m in groups.items() if m], cfg.unseen_clients, seed)
        report.notes.append(f"held out of training (unseen): {', '.join(unseen_names)}")
    clients, skipped = {}, {}
    for name, members in groups.items():
        if not members:
            report.drop("empty client after partition")
            continue
        if name in unseen_names:
            continue
        train, held = heldout_split(members, cfg.heldout_fraction)
        if not train:  # a small client whose every prompt hashed into its held-out slice: nothing to train on
            skipped[name] = len(held)
            continue
        kept, spare = cap_split(train, cfg.max_train_pairs_per_client)
        clients[name] = ClientData(name, kept, held, spare=spare)
    report.skip_clients(skipped)
    if not clients:
        raise DataError(cfg.train_split, f"no client has training pairs (skipped: {sorted(skipped)})")

    eval_report = None
    eval_only: dict[str, list[Comparison]] = {}
    unseen_eval: dict[str, list[Comparison]] = defaultdict(list)
    if cfg.eval_split:
        test_pairs, eval_report = load_split(cfg, cfg.eval_split)
        by_client: dict[str, list[Comparison]] = defaultdict(list)
        natural = cfg.partition.method == "natural"
        for p in test_pairs:
            by_client[namer(p.client, p.prompt) if natural else p.client].append(p)
        for name, members in sorted(by_client.items()):
            if name in unseen_names:  # never part of the seen clients' evaluation
                unseen_eval[name] = members
                continue
            members = cap(members, cfg.max_eval_pairs_per_client)
            if name in clients:
                clients[name].test = members
            else:
                eval_only[name] = members
    unseen = _unseen_clients(cfg, groups, unseen_names, unseen_eval, report)
    return FederatedData(clients, report, eval_report, eval_only, unseen)


UNUSABLE_UNSEEN = "pairs of unseen clients with no labelled slice or nothing left to evaluate"


def _unseen_clients(cfg, groups, names, evaluation, report: LoadReport) -> dict[str, ClientData]:
    out, unusable = {}, {}
    for name in names:
        labelled, remaining = unseen_split(
            groups[name], evaluation.get(name, []), cfg.heldout_fraction, cfg.max_eval_pairs_per_client
        )
        if labelled and remaining:
            out[name] = ClientData(name, [], labelled, remaining)
        else:
            unusable[name] = len(labelled) + len(remaining)
    if unusable:
        report.drop(UNUSABLE_UNSEEN, sum(unusable.values()))
        report.notes.append(
            f"left out {len(unusable)} unseen client(s) with no labelled slice (no prompt in the held-out "
            f"slice) or nothing left to evaluate: {', '.join(sorted(unusable))}"
        )
        if not out:
            raise DataError(
                "data.unseen_clients",
                f"no unseen client has both a labelled slice and pairs to evaluate ({', '.join(sorted(unusable))})",
            )
    return out
