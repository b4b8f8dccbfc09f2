import pytest

from fedbiscuit.config import PartitionConfig, SHPData
from fedbiscuit.data import DataError, prepare_data
from fedbiscuit.data.sources import shp
from tests.fixtures import shp_row, write_jsonl


def test_labels_one_means_a_is_preferred(tmp_path):
    # Pins the direction from the SHP card ("1 if A is preferred to B"); the reference code has it backwards.
    write_jsonl(
        tmp_path / "askculinary" / "train.json",
        [
            shp_row("How do I sear?", "Hot pan, dry meat.", "Just wing it.", 1, "askculinary_train", "p1"),
            shp_row("Salt pasta water?", "No.", "Yes, generously.", 0, "askculinary_train", "p2"),
        ],
    )
    pairs, _ = shp.load(SHPData(root=str(tmp_path)), "train")
    assert pairs[0].label == 1.0 and pairs[0].response_a == "Hot pan, dry meat."
    assert pairs[0].hard_label == 1
    assert pairs[1].label == 0.0 and pairs[1].hard_label == 0
    assert {p.client for p in pairs} == {"askculinary"}


def test_dirichlet_over_domains_keeps_every_pair(tmp_path):
    for d, dom in enumerate(["askculinary", "askphysics", "legaladvice"]):
        write_jsonl(
            tmp_path / dom / "train.json",
            [shp_row(f"{dom} q{i}", f"a{i}", f"b{i}", i % 2, dom, f"{d}-{i}") for i in range(30)],
        )
    cfg = SHPData(
        root=str(tmp_path),
        eval_split=None,
        heldout_fraction=0.0,
        partition=PartitionConfig(method="dirichlet", num_clients=6, alpha=0.3),
    )
    fed = prepare_data(cfg, seed=1)
    assert len(fed.clients) == 6
    assert sum(len(c.train) for c in fed.clients.values()) == 90
    uids = [p.uid for c in fed.clients.values() for p in c.train]
    assert len(set(uids)) == 90  # disjoint
    # alpha=0.3 makes clients skewed: some client is dominated by one domain
    shares = [
        max(sum(p.client == d for p in c.train) for d in ("askculinary", "askphysics", "legaladvice"))
        / len(c.train)
        for c in fed.clients.values()
    ]
    assert max(shares) > 0.6
    again = prepare_data(cfg, seed=1)
    assert {n: [p.uid for p in c.train] for n, c in again.clients.items()} == {
        n: [p.uid for p in c.train] for n, c in fed.clients.items()
    }


def test_bad_label_is_named(tmp_path):
    write_jsonl(tmp_path / "askphysics" / "train.json", [shp_row("q", "a", "b", 5, "askphysics")])
    with pytest.raises(DataError, match="field 'labels'"):
        shp.load(SHPData(root=str(tmp_path)), "train")


def test_domains_filter_matches_the_domain_without_its_split_suffix(tmp_path):
    # The rows carry the hub's "askculinary_train"; the config names the domain itself.
    for dom in ("askculinary", "askphysics"):
        write_jsonl(
            tmp_path / dom / "train.json",
            [shp_row(f"{dom} q{i}", f"a{i}", f"b{i}", i % 2, f"{dom}_train", f"{dom}{i}") for i in range(3)],
        )
    pairs, report = shp.load(SHPData(root=str(tmp_path), domains=["askculinary"]), "train")
    assert [p.uid for p in pairs] == ["askculinary0", "askculinary1", "askculinary2"]
    assert report.kept == {"askculinary": 3} and not report.dropped


def test_a_domain_that_matches_no_rows_is_named(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "askculinary" / "train.json", [shp_row("q", "a", "b", 1, "askculinary_train")])
    with pytest.raises(DataError, match="askcooking"):
        shp.load(SHPData(root=str(tmp_path), domains=["askcooking"]), "train")  # no such folder
    # on the hub every domain sits in one table: a domain no row carries is an error, not an empty run
    rows = [
        (1, shp_row("q", "a", "b", 1, "askculinary_train")),
        (2, shp_row("r", "c", "d", 0, "askphysics_train")),
    ]
    monkeypatch.setattr(shp, "hub_rows", lambda hub_id, split: iter(rows))
    pairs, _ = shp.load(SHPData(domains=["askphysics"]), "train")
    assert [(p.prompt, p.client) for p in pairs] == [("r", "askphysics")]
    with pytest.raises(DataError, match="data.domains names domains with no 'train' rows: askcooking"):
        shp.load(SHPData(domains=["askphysics", "askcooking"]), "train")


def test_dirichlet_assigns_posts_and_their_comparisons_follow(tmp_path):
    # SHP has several comparisons per post; the reference partitions the posts, so a post never sits on two
    # clients (a per-pair partition spreads a post's 4 comparisons over several of the 5 clients).
    for dom in ("askculinary", "askphysics"):
        rows = [
            shp_row(f"{dom} post {i}", f"a{i}-{j}", f"b{i}-{j}", j % 2, f"{dom}_train", f"{dom}-{i}")
            for i in range(12)
            for j in range(4)
        ]
        write_jsonl(tmp_path / dom / "train.json", rows)
    cfg = SHPData(
        root=str(tmp_path),
        eval_split=None,
        heldout_fraction=0.0,
        partition=PartitionConfig(method="dirichlet", num_clients=5, alpha=0.3),
    )
    for seed in range(3):
        fed = prepare_data(cfg, seed=seed)
        owner: dict[str, set[str]] = {}
        for name, c in fed.clients.items():
            for p in c.train:
                owner.setdefault(p.uid, set()).add(name)
        assert len(owner) == 24 and all(len(clients) == 1 for clients in owner.values())
        assert sum(len(c.train) for c in fed.clients.values()) == 96
        assert all(len(c.train) % 4 == 0 for c in fed.clients.values())  # whole posts only
