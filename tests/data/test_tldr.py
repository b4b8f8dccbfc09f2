import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedbiscuit.config import PartitionConfig, TLDRData
from fedbiscuit.data import DataError, prepare_data
from fedbiscuit.data.sources import tldr
from tests.fixtures import tldr_row, write_jsonl


def _rows():
    return [
        tldr_row("post one", "s1", "s2", 0, "w1", "train", 1),
        tldr_row("post two", "s3", "s4", 1, "w1", "train", 2),
        tldr_row("post three", "s5", "s6", 1, "w2", "train", 3),
        tldr_row("post four", "s7", "s8", 0, "w3", "valid1", 4),
        tldr_row("post five", "same", "same", 0, "w3", "train", 5),
        tldr_row("post six", "s9", "s10", 1, "w4", "valid2", 6),
    ]


def test_batch_files_choice_and_workers(tmp_path):
    write_jsonl(tmp_path / "comparisons" / "batch3.json", _rows())
    pairs, report = tldr.load(TLDRData(root=str(tmp_path)), "train")
    assert [(p.response_a, p.label, p.client) for p in pairs] == [
        ("s1", 1.0, "w1"),
        ("s3", 0.0, "w1"),
        ("s5", 0.0, "w2"),
    ]
    assert pairs[0].prompt == "SUBREDDIT: r/relationships\nTITLE: title 1\nPOST: post one"
    assert report.dropped == {"identical responses": 1}
    valid, _ = tldr.load(TLDRData(root=str(tmp_path)), "validation")
    assert [p.client for p in valid] == ["w3"]  # valid1 only
    test, _ = tldr.load(TLDRData(root=str(tmp_path)), "test")
    assert [p.client for p in test] == ["w4"]  # valid2 only


def test_hub_parquet_layout(tmp_path):
    rows = [r for r in _rows() if r["split"] == "train"]
    for r in rows:
        del r["split"]  # the hub's per-split parquet files
        del r["extra"]  # an empty struct, which Parquet cannot store
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000.parquet")
    pairs, _ = tldr.load(TLDRData(root=str(tmp_path)), "train")
    assert [(p.response_b, p.label) for p in pairs] == [("s2", 1.0), ("s4", 0.0), ("s6", 0.0)]


def test_every_worker_is_kept_and_small_ones_merged_on_request(tmp_path):
    rows = [tldr_row(f"p{i}", f"a{i}", f"b{i}", i % 2, "big", "train", i) for i in range(6)]
    rows += [tldr_row("q1", "x", "y", 0, "tiny1"), tldr_row("q2", "x", "y", 0, "tiny2")]
    write_jsonl(tmp_path / "batch1.json", rows)
    cfg = TLDRData(root=str(tmp_path), eval_split=None, heldout_fraction=0.0)
    assert sorted(prepare_data(cfg).clients) == ["big", "tiny1", "tiny2"]
    cfg.partition = PartitionConfig(merge_below=3)
    fed = prepare_data(cfg)
    assert {n: len(c.train) for n, c in fed.clients.items()} == {"big": 6, "merged-small": 2}
    assert any("merged 2 natural clients" in note for note in fed.report.notes)


def test_bad_choice_is_named(tmp_path):
    write_jsonl(tmp_path / "batch1.json", [tldr_row("p", "a", "b", 2, "w")])
    with pytest.raises(DataError, match="line 1, field 'choice'"):
        tldr.load(TLDRData(root=str(tmp_path)), "train")


def test_hub_parquet_files_are_read_by_split(tmp_path):
    # the hub's validation file holds valid1 and valid2 rows: valid1 is our validation split, valid2 our test
    for split, rows in (("train", _rows()[:2]), ("validation", [_rows()[3], _rows()[5]])):
        for r in rows:
            r.pop("extra", None)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{split}-00000-of-00001.parquet")
    train, _ = tldr.load(TLDRData(root=str(tmp_path)), "train")
    valid, _ = tldr.load(TLDRData(root=str(tmp_path)), "validation")
    test, _ = tldr.load(TLDRData(root=str(tmp_path)), "test")
    assert [p.response_a for p in train] == ["s1", "s3"] and [p.response_a for p in valid] == ["s7"]
    assert [p.response_a for p in test] == ["s9"]


def test_the_hub_serves_test_from_its_validation_split(monkeypatch):
    asked = []

    def hub_rows(hub_id, split, name):
        asked.append((split, name))
        return iter(enumerate([r for r in _rows() if r["split"] != "train"], start=1))

    monkeypatch.setattr(tldr, "hub_rows", hub_rows)
    valid, _ = tldr.load(TLDRData(), "validation")
    test, _ = tldr.load(TLDRData(), "test")
    assert asked == [("validation", "comparisons")] * 2
    assert [p.response_a for p in valid] == ["s7"] and [p.response_a for p in test] == ["s9"]


def test_a_validation_row_without_its_split_is_an_error(tmp_path):
    row = _rows()[3]
    del row["split"], row["extra"]
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "validation-00000-of-00001.parquet")
    with pytest.raises(DataError, match="field 'split'"):
        tldr.load(TLDRData(root=str(tmp_path)), "test")
