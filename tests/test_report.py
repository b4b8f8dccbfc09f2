"""Cluster purity and its chance probability, and the clusters plot (report.py)."""

from __future__ import annotations

import random

from fedbiscuit.report import adjusted_rand, chance_probability, purity


def _clients(groups: int, per_group: int) -> list[str]:
    return [f"g{g}#{i}" for g in range(groups) for i in range(per_group)]


def test_purity_counts_each_clusters_majority_group():
    a = {"x#0": "s0", "x#1": "s0", "y#0": "s0", "y#1": "s1", "y#2": "s1", "x#2": "s1"}
    assert purity(a) == 4 / 6  # s0: 2 of x; s1: 2 of y


def test_a_perfect_split_is_unlikely_by_chance():
    clients = _clients(2, 8)
    split = {c: "s0" if c.startswith("g0") else "s1" for c in clients}
    # two of the C(16, 8) = 12,870 ways to deal 16 clients into two clusters of 8 are this pure: p = 1.6e-4
    assert purity(split) == 1.0
    assert chance_probability(split, draws=20_000) < 2e-3


def test_chance_probability_matches_enumeration():
    # 4 clients, 2 groups of 2, 2 clusters of 2: of the 6 ways to fill the clusters, 2 keep the groups apart
    split = {"a#0": "s0", "a#1": "s0", "b#0": "s1", "b#1": "s1"}
    assert abs(chance_probability(split, draws=30_000) - 2 / 6) < 0.015
    mixed = {"a#0": "s0", "b#0": "s0", "a#1": "s1", "b#1": "s1"}
    # the least pure grouping: every draw is at least as pure
    assert chance_probability(mixed, draws=2_000) == 1.0


def test_random_balanced_clusters_are_not_significant():
    clients = _clients(4, 4)
    rng = random.Random(3)
    ps = []
    for _ in range(20):
        slots = ["s0"] * 8 + ["s1"] * 8
        rng.shuffle(slots)
        ps.append(
            chance_probability(dict(zip(clients, slots, strict=True)), draws=500, seed=rng.randrange(1000))
        )
    # under the null the p-value is (about) uniform: few of 20 random groupings fall below 0.05
    assert sum(p < 0.05 for p in ps) <= 3
    assert sorted(ps)[10] > 0.2


def test_the_group_can_be_any_client_label():
    clients = _clients(4, 4)
    harm = {c: "harm" if c.startswith("g0") else "help" for c in clients}
    split = {c: "s0" if c.startswith(("g0", "g1")) else "s1" for c in clients}
    assert purity(split, group_of=harm.get) == 12 / 16  # s0: 4 harm + 4 help; s1: 8 help


def test_adjusted_rand_by_hand():
    a = {"x#0": "s0", "x#1": "s0", "y#0": "s0", "y#1": "s1", "y#2": "s1", "x#2": "s1"}
    # pairs together in both: 2; expected (3+3)(3+3)/15 = 2.4; max (6+6)/2 = 6
    assert abs(adjusted_rand(a) - (2 - 2.4) / (6 - 2.4)) < 1e-12
    split = {c: "s0" if c.startswith("g0") else "s1" for c in _clients(2, 3)}
    assert adjusted_rand(split) == 1.0


def test_a_minority_group_kept_together_by_balanced_clusters():
    # 4 harmlessness clients among 16, two balanced clusters of 8: all 4 on one selector is the best any
    # balanced grouping can do; purity cannot see it (75% either way), the adjusted Rand index can, and its
    # chance probability is that of 4 given clients landing in one cluster: 2 C(12, 4) / C(16, 8) = 0.077
    clients = _clients(4, 4)
    harm = {c: "harm" if c.startswith("g0") else "help" for c in clients}
    together = {c: "s0" if c.startswith(("g0", "g1")) else "s1" for c in clients}
    apart = {c: "s0" if c.endswith(("#0", "#1")) else "s1" for c in clients}
    assert purity(together, harm.get) == purity(apart, harm.get) == 0.75
    assert adjusted_rand(together, harm.get) > 0.1 > adjusted_rand(apart, harm.get)
    p = chance_probability(together, harm.get, adjusted_rand, draws=20_000)
    assert abs(p - 2 * 495 / 12_870) < 0.01


def test_the_clusters_plot_ticks_the_clients_decided_relative_to_the_others(tmp_path, monkeypatch):
    from fedbiscuit import report

    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig))
    assignment = {"a": "selector-0", "b": "selector-1"}
    logged = {"assignment": assignment, "losses": {"a": {}, "b": {}}, "decided": 2, "median_z": 5.04}
    run = {
        "name": "r",
        "groupings": [
            {"round": 4, **logged, "relative_decided": 0, "relative_median_z": 0.6},  # this session's runs
            {"round": 8, **logged},  # a run logged before relative margins were recorded: the raw ones
        ],
    }
    report._clusters_plot([run], tmp_path / "clusters.png")
    ticks = [t.get_text() for t in figures[0].axes[0].get_xticklabels()]
    assert ticks == ["4\n0/2\nz 0.6", "8\n2/2\nz 5.0"]
    assert "relative to the others" in figures[0].axes[0].get_xlabel()
    run["groupings"] = run["groupings"][1:]  # raw counts only: the label does not claim relative ones
    report._clusters_plot([run], tmp_path / "clusters.png")
    assert "relative" not in figures[1].axes[0].get_xlabel()
    # a run grouped by gradient directions only: the label names what its ticks show, no decided counts
    run["groupings"] = [{"round": 4, "assignment": assignment, "median_margin": 1.61, "trusted": None}]
    report._clusters_plot([run], tmp_path / "clusters.png")
    assert [t.get_text() for t in figures[2].axes[0].get_xticklabels()] == ["4\ncos margin\n1.61"]
    assert (
        figures[2].axes[0].get_xlabel()
        == "grouping round / median cosine margin (grouped by update directions)"
    )
