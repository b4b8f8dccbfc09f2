import gzip

import pytest

from fedbiscuit.config import HHRLHFData
from fedbiscuit.data import DataError, prepare_data
from fedbiscuit.data.sources import hh_rlhf
from fedbiscuit.data.sources.hh_rlhf import split_transcript
from tests.fixtures import hh_row, hh_transcript, write_hh


def test_split_transcript_keeps_the_whole_context():
    text = hh_transcript(
        [("Human", "hi"), ("Assistant", "hello"), ("Human", "how?"), ("Assistant", "like this")]
    )
    context, answer = split_transcript(text)
    assert context == "Human: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:"
    assert answer == "like this"
    assert split_transcript("\n\nHuman: no answer") is None


def test_loader_pairs_and_counts_drops(tmp_path):
    same = hh_row("q3", "same", "same")
    differ = {
        "chosen": hh_transcript([("Human", "a"), ("Assistant", "x")]),
        "rejected": hh_transcript([("Human", "b"), ("Assistant", "y")]),
    }
    write_hh(
        tmp_path,
        "harmless-base",
        "train",
        [hh_row("q1", "no", "sure"), hh_row("q2", "ok", "bad"), same, differ],
    )
    write_hh(tmp_path, "helpful-base", "train", [hh_row("q4", "good", "bad")])
    pairs, report = hh_rlhf.load(
        HHRLHFData(root=str(tmp_path), subsets=["harmless-base", "helpful-base"]), "train"
    )
    assert [(p.response_a, p.response_b, p.label, p.client) for p in pairs] == [
        ("no", "sure", 1.0, "harmless-base"),
        ("ok", "bad", 1.0, "harmless-base"),
        ("good", "bad", 1.0, "helpful-base"),
    ]
    assert pairs[0].prompt == "Human: q1\n\nAssistant:"
    assert report.dropped == {"identical responses": 1, "contexts differ": 1}
    assert report.kept == {"harmless-base": 2, "helpful-base": 1}


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_hh(tmp_path, "helpful-base", "train", [hh_row("q", "a", "b"), "{not json"])
    with pytest.raises(DataError) as err:
        hh_rlhf.load(HHRLHFData(root=str(tmp_path), subsets=["helpful-base"]), "train")
    assert str(path) in str(err.value) and "line 2" in str(err.value)


def test_missing_and_mistyped_fields_are_named(tmp_path):
    write_hh(tmp_path, "helpful-base", "train", [{"chosen": "\n\nHuman: q\n\nAssistant: a"}])
    with pytest.raises(DataError, match=r"line 1, field 'rejected': missing"):
        hh_rlhf.load(HHRLHFData(root=str(tmp_path), subsets=["helpful-base"]), "train")
    write_hh(tmp_path, "helpful-base", "train", [{"chosen": 3, "rejected": "x"}])
    with pytest.raises(DataError, match=r"field 'chosen': expected str, got int"):
        hh_rlhf.load(HHRLHFData(root=str(tmp_path), subsets=["helpful-base"]), "train")


def test_empty_and_missing_files(tmp_path):
    path = tmp_path / "helpful-base" / "train.jsonl.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as fh:
        fh.write("\n")
    with pytest.raises(DataError, match="no rows"):
        hh_rlhf.load(HHRLHFData(root=str(tmp_path), subsets=["helpful-base"]), "train")
    with pytest.raises(DataError, match="harmless-base"):
        hh_rlhf.load(HHRLHFData(root=str(tmp_path), subsets=["harmless-base"]), "train")


def test_real_hh_rlhf_four_clients(real_data):
    cfg = HHRLHFData(root=str(real_data))
    fed = prepare_data(cfg)
    assert sorted(fed.clients) == [
        "harmless-base",
        "helpful-base",
        "helpful-online",
        "helpful-rejection-sampled",
    ]
    # README row counts: every line is either kept or dropped with a reason
    lines = {
        "harmless-base": 1436,
        "helpful-base": 1500,
        "helpful-online": 731,
        "helpful-rejection-sampled": 1780,
    }
    assert sum(fed.report.kept.values()) + sum(fed.report.dropped.values()) == sum(lines.values())
    for name, n in lines.items():
        c = fed.clients[name]
        assert len(c.train) + len(c.heldout) == fed.report.kept[name] <= n
        assert c.test, name
    assert fed.report.dropped["identical responses"] > 0  # the README says a few exist
    # the held-out slice and the test split share no prompt with the training slice
    for c in fed.clients.values():
        train_prompts = {p.prompt for p in c.train}
        assert not train_prompts & {p.prompt for p in c.heldout}


def test_hh_cut_into_256_clients_at_population_scale(real_data):
    # The four subsets cut into 64 parts each: every pair on exactly one client, and every test pair on the
    # client that holds its prompt's part (so seen clients are evaluated on their own people's pairs).
    from fedbiscuit.config import PartitionConfig

    cfg = HHRLHFData(root=str(real_data), partition=PartitionConfig(split_each=64))
    data = prepare_data(cfg, seed=0)
    assert len(data.clients) == 256
    sizes = [len(c.train) + len(c.heldout) for c in data.clients.values()]
    assert sum(sizes) == sum(data.report.kept.values())  # nothing lost in the cut
    assert len({p.uid for c in data.clients.values() for p in c.train + c.heldout}) == sum(sizes)
    assert min(sizes) >= 5 and max(sizes) <= 60  # ~21 pairs each: a hash split is balanced
    assert not data.eval_only and sum(len(c.test) for c in data.clients.values()) > 1000


def test_hh_dirichlet_over_256_clients_names_the_fix_or_counts_empty_clients(real_data):
    from fedbiscuit.config import PartitionConfig

    strict = HHRLHFData(
        root=str(real_data), partition=PartitionConfig(method="dirichlet", num_clients=256, alpha=0.3)
    )
    with pytest.raises(
        ValueError, match=r"alpha=0.3 .* min_partition_size=1 .* partition.min_partition_size=0"
    ):
        prepare_data(strict, seed=0)
    loose = strict.model_copy(
        update={
            "partition": PartitionConfig(method="dirichlet", num_clients=256, alpha=0.3, min_partition_size=0)
        }
    )
    data = prepare_data(loose, seed=0)
    empty = data.report.dropped["empty client after partition"]
    assert 0 < empty < 32 and len(data.clients) + empty + len(data.report.skipped) == 256
