"""The server's decisions for FedBis, FedBiscuit and the baselines, independent of any engine.

Every algorithm is a set of named selectors plus a rule for which selector a sampled client trains:
- fedbis / centralized: one selector, everyone trains it (centralized has a single client holding all data);
- local: one selector per client, never averaged;
- oracle: one selector per known group of raters (the client's natural id, its name before '#'), trained within
  that group from round 0: FedBiscuit's clusters as they would be if the grouping always found the groups;
- fedbiscuit: K selectors; warm-up trains selector r // W in round r; from round K*W on, every G rounds the
  clients are regrouped into K balanced clusters and each trains its cluster's selector. The grouping reads
  every client's held-out loss under every selector (``grouping: loss``, the paper's), or the directions in
  which the clients' data pull one shared selector (``grouping: updates``, clustered FL's).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..config import FederatedConfig
from .checkpoint import ServerState
from .client import TrainReply
from .grouping import assign, balanced_kmeans
from .server import aggregate, sample_clients


class Algorithm:
    def __init__(self, cfg: FederatedConfig, client_names: list[str], seed: int):
        self.cfg = cfg
        self.clients = list(client_names)
        self.seed = seed
        if len(self.clients) < cfg.min_clients:
            # every round would fall short of min_clients valid returns: say so before round 0
            raise ValueError(
                f"only {len(self.clients)} clients can train ({', '.join(self.clients) or 'none'}), fewer than "
                f"federated.min_clients={cfg.min_clients}"
            )
        fb = cfg.fedbiscuit
        if cfg.algorithm == "fedbiscuit":
            if fb.num_selectors > len(self.clients):
                raise ValueError(
                    f"federated.fedbiscuit.num_selectors={fb.num_selectors} exceeds the {len(self.clients)} clients"
                )
            self.selectors = [f"selector-{k}" for k in range(fb.num_selectors)]
            self.grouping_start = fb.num_selectors * fb.warmup_rounds
        elif cfg.algorithm == "local":
            self.selectors = list(self.clients)
        elif cfg.algorithm == "oracle":
            self.groups = {c: c.split("#", 1)[0] for c in self.clients}
            self.selectors = sorted(set(self.groups.values()))
            if len(self.selectors) == len(self.clients):
                raise ValueError(
                    "federated.algorithm=oracle groups clients by their natural id (the name before '#'), but every "
                    "client is its own group, which is the local baseline: use partition.method=natural with "
                    "partition.split_each > 1"
                )
        else:
            self.selectors = ["selector-0"]

    # ------------------------------------------------------------------ schedule
    def regroup_due(self, round_: int) -> bool:
        if self.cfg.algorithm != "fedbiscuit" or round_ < self.grouping_start:
            return False
        return (round_ - self.grouping_start) % self.cfg.fedbiscuit.regroup_every == 0

    def sampled(self, round_: int) -> list[str]:
        return sample_clients(self.clients, self.cfg.clients_per_round, self.seed, round_)

    def plan(self, state: ServerState, round_: int) -> dict[str, str]:
        """Sampled client -> the selector it trains this round."""
        chosen = self.sampled(round_)
        algo = self.cfg.algorithm
        if algo == "local":
            return {c: c for c in chosen}
        if algo == "oracle":
            return {c: self.groups[c] for c in chosen}
        if algo == "fedbiscuit":
            if round_ < self.grouping_start:
                return {c: self.selectors[round_ // self.cfg.fedbiscuit.warmup_rounds] for c in chosen}
            return {c: state.clusters[c] for c in chosen}
        return {c: self.selectors[0] for c in chosen}

    def initial_clusters(self) -> dict[str, str]:
        """Client -> its selector before any grouping: the known groups for the oracle, else none."""
        return dict(self.groups) if self.cfg.algorithm == "oracle" else {}

    def warming_up(self, round_: int) -> bool:
        return self.cfg.algorithm == "fedbiscuit" and round_ < self.grouping_start

    # ------------------------------------------------------------------ grouping
    def group(self, losses: dict[str, dict[str, float]], round_: int) -> dict[str, str]:
        """Balanced disjoint clusters from every client's held-out loss under every selector."""
        names = [c for c in self.clients if c in losses]
        matrix = np.array([[losses[c][s] for s in self.selectors] for c in names])
        idx = assign(matrix, self.cfg.fedbiscuit.assignment, seed=self.seed * 7919 + round_)
        return {c: self.selectors[i] for c, i in zip(names, idx, strict=True)}

    def group_by_updates(
        self,
        deltas: dict[str, np.ndarray],
        moved: dict[str, np.ndarray],
        round_: int,
        previous: dict[str, str] | None = None,
    ) -> tuple[dict[str, str], dict[str, float]]:
        """Balanced clusters of the clients' update directions (``deltas``: each client's change from the
        selectors' mean, after a round of training or one gradient step), minus their mean, and which selector
        serves which cluster: the one that has already moved most toward that cluster's direction (``moved``:
        each selector minus that mean); after the first grouping, the selector most of the cluster's members had
        (``previous``). Also, per client, its cosine to its own cluster's centre minus its best cosine to
        another's."""
        names = [c for c in self.clients if c in deltas]
        k = len(self.selectors)
        x = np.stack([deltas[c] for c in names])
        x = x - x.mean(0)  # what every client learns alike says nothing about groups: cluster the deviations
        idx, centroids = balanced_kmeans(x, k, seed=self.seed * 7919 + round_)
        towards = np.stack([moved[s] for s in self.selectors])
        towards = towards / np.maximum(np.linalg.norm(towards, axis=1, keepdims=True), 1e-12)
        affinity = centroids @ towards.T  # in [-1, 1]
        if previous:
            # Keep each group on the selector it trained: the cluster takes the selector most of its members had
            # (the direction only breaks ties). Without this the same clusters swapped selectors between
            # groupings (BENCHMARKS.md, session 9), so each selector was retrained by another group.
            for i, c in enumerate(names):
                if c in previous:
                    affinity[idx[i], self.selectors.index(previous[c])] += 2.0
        clusters, selectors = linear_sum_assignment(-affinity)
        serves = {int(j): self.selectors[int(s)] for j, s in zip(clusters, selectors, strict=True)}
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        cos = x @ centroids.T
        margins = {
            c: float(cos[i, idx[i]] - max((cos[i, j] for j in range(k) if j != idx[i]), default=0.0))
            for i, c in enumerate(names)
        }
        return {c: serves[idx[i]] for i, c in enumerate(names)}, margins

    # ------------------------------------------------------------------ aggregation
    def update_rule(self, round_: int) -> str:
        """How round ``round_``'s replies update a selector: the configured rule once the clients are grouped.

        The reference averages plainly while the selectors warm up and takes its 1/N delta step only from the
        first grouping on; a warm-up round with the 1/N step would move a selector by (sampled / all clients)
        of its members' mean change.
        """
        if self.cfg.algorithm != "fedbiscuit" or self.warming_up(round_):
            return "mean"
        return self.cfg.fedbiscuit.update

    def needs_client_sizes(self, round_: int) -> bool:
        """The paper rule weighted by samples divides by every client's samples, not only the sampled ones'."""
        return self.update_rule(round_) == "paper" and self.cfg.weighting == "samples"

    def aggregate(
        self,
        state: ServerState,
        replies: dict[str, list[TrainReply]],
        round_: int,
        client_sizes: dict[str, int] | None = None,
    ) -> None:
        """Update every selector that received valid replies this round from those replies only.

        ``client_sizes``: every client's training pairs (see needs_client_sizes)."""
        rule = self.update_rule(round_)
        total = sum(client_sizes[c] for c in self.clients) if client_sizes else None
        for selector, group in replies.items():
            if group:
                state.selectors[selector] = aggregate(
                    state.selectors[selector],
                    group,
                    self.cfg.weighting,
                    rule,
                    num_clients=len(self.clients),
                    total_samples=total,
                )
