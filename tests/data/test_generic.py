import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedbiscuit.config import ColumnMap, GenericData
from fedbiscuit.data import DataError, prepare_data
from fedbiscuit.data.sources import generic
from tests.fixtures import write_jsonl

AB = ColumnMap(response_a="response_a", response_b="response_b", preference="preference", client="annotator")


def _ab_rows():
    return [
        {
            "prompt": "p1",
            "response_a": "x",
            "response_b": "y",
            "preference": "a-is-better",
            "annotator": "u1",
        },
        {
            "prompt": "p2",
            "response_a": "x",
            "response_b": "y",
            "preference": "b-is-slightly-better",
            "annotator": "u2",
        },
        {"prompt": "p3", "response_a": "x", "response_b": "y", "preference": "tie", "annotator": "u2"},
    ]


def test_ab_layout_ties_dropped_or_soft(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", _ab_rows())
    pairs, report = generic.load(GenericData(root=str(tmp_path), columns=AB), "train")
    assert [(p.label, p.client) for p in pairs] == [(1.0, "u1"), (0.0, "u2")]
    assert report.dropped == {"tie": 1}
    pairs, report = generic.load(GenericData(root=str(tmp_path), columns=AB, ties="soft"), "train")
    assert [p.label for p in pairs] == [1.0, 0.0, 0.5] and not report.dropped
    assert pairs[2].hard_label is None


def test_unknown_preference_value_is_named(tmp_path):
    rows = _ab_rows()
    rows[1]["preference"] = "a-is-much-better"
    write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"line 2, field 'preference': preference value 'a-is-much-better'"):
        generic.load(GenericData(root=str(tmp_path), columns=AB), "train")


def test_csv_and_parquet_with_chosen_rejected_and_soft_label(tmp_path):
    rows = [
        {"q": "p1", "good": "g", "bad": "b", "p": 0.8, "who": "c1"},
        {"q": "p2", "good": "g2", "bad": "b2", "p": 0.6, "who": "c2"},
    ]
    cols = ColumnMap(prompt="q", chosen="good", rejected="bad", soft_label="p", client="who")
    with open(tmp_path / "train.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    for fmt in ("csv", "parquet"):
        pairs, _ = generic.load(GenericData(root=str(tmp_path), format=fmt, columns=cols), "train")
        assert [(p.prompt, p.response_a, p.label, p.client) for p in pairs] == [
            ("p1", "g", 0.8, "c1"),
            ("p2", "g2", 0.6, "c2"),
        ]


def test_bad_soft_label_and_missing_column(tmp_path):
    cols = ColumnMap(chosen="chosen", rejected="rejected", soft_label="p")
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "p": 1.7}])
    with pytest.raises(DataError, match=r"field 'p'.*\[0, 1\]"):
        generic.load(GenericData(root=str(tmp_path), columns=cols), "train")
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataError, match=r"train.jsonl, line 1, field 'rejected'"):
        generic.load(GenericData(root=str(tmp_path)), "train")


def test_column_layout_must_be_one():
    with pytest.raises(ValueError, match="exactly one layout"):
        ColumnMap(chosen="c", rejected="r", response_a="a", response_b="b", preference="p")


def test_real_tulu_human_eval_by_annotator(real_data):
    root = real_data / "tulu-human-eval"
    raw = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines() if line.strip()]
    cfg = GenericData(root=str(root), columns=AB, heldout_fraction=0.0)
    fed = prepare_data(cfg)
    assert len(fed.clients) == 16  # the README: 16 annotators
    ties = sum(r["preference"] == "tie" and r["response_a"].strip() != r["response_b"].strip() for r in raw)
    assert fed.report.dropped["tie"] == ties
    assert sum(len(c.train) for c in fed.clients.values()) + sum(fed.report.dropped.values()) == len(raw)
    soft = prepare_data(GenericData(root=str(root), columns=AB, heldout_fraction=0.0, ties="soft"))
    assert sum(p.label == 0.5 for c in soft.clients.values() for p in c.train) > 0
    assert all(c.test for c in fed.clients.values() if len(c.train) > 20)


def _lonely_rows():
    # "lonely 3" hashes into a 0.25 held-out slice, "lonely 0" and "lonely 1" do not
    return [
        {"prompt": "lonely 0", "chosen": "a", "rejected": "b", "user": "u1"},
        {"prompt": "lonely 1", "chosen": "a", "rejected": "b", "user": "u1"},
        {"prompt": "lonely 3", "chosen": "a", "rejected": "b", "user": "u2"},
    ]


def test_a_client_with_no_training_pairs_is_skipped_counted_and_named(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", _lonely_rows())
    write_jsonl(tmp_path / "test.jsonl", _lonely_rows())
    cfg = GenericData(root=str(tmp_path), columns=ColumnMap(client="user"), heldout_fraction=0.25)
    fed = prepare_data(cfg)
    assert list(fed.clients) == ["u1"] and len(fed.clients["u1"].train) == 2
    assert fed.report.skipped == {"u2": 1}
    assert fed.report.dropped == {"held-out pairs of clients with no training pairs": 1}
    assert any("skipped 1 client(s)" in n and n.endswith(": u2") for n in fed.report.notes)
    assert [p.prompt for p in fed.eval_only["u2"]] == ["lonely 3"]  # its test pairs are still evaluated


def test_no_client_with_training_pairs_is_an_error(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", _lonely_rows()[2:])
    cfg = GenericData(root=str(tmp_path), columns=ColumnMap(client="user"), heldout_fraction=0.25)
    with pytest.raises(DataError, match="no client has training pairs"):
        prepare_data(cfg)


def _planted(tmp_path, **data):
    from fedbiscuit.data.synthetic import write_planted

    write_planted(tmp_path, clients=8)
    return GenericData(root=str(tmp_path), columns=ColumnMap(client="client"), heldout_fraction=0.25, **data)


def test_unseen_clients_leave_training_and_the_seen_evaluation_entirely(tmp_path):
    from fedbiscuit.data.partition import heldout_split

    base = prepare_data(_planted(tmp_path, max_eval_pairs_per_client=6))
    fed = prepare_data(
        _planted(tmp_path, max_eval_pairs_per_client=6, unseen_clients=["client-2", "client-5"])
    )
    assert list(fed.unseen) == ["client-2", "client-5"]
    assert set(fed.clients) == set(base.clients) - {"client-2", "client-5"}
    assert not set(fed.all_test()) & {"client-2", "client-5"} and not fed.eval_only
    assert fed.clients["client-0"] == base.clients["client-0"]  # seen clients are unchanged
    assert "held out of training (unseen): client-2, client-5" in fed.report.notes
    u = fed.unseen["client-2"]
    own = base.clients["client-2"].train + base.clients["client-2"].heldout
    labelled = heldout_split(own, 0.25)[1]  # its held-out slice, by the usual rule
    assert u.train == [] and sorted(p.uid for p in u.heldout) == sorted(p.uid for p in labelled)
    assert len(u.heldout) == 3 and len(u.test) == 6  # everything else, capped like evaluation pairs
    assert not {p.prompt for p in u.heldout} & {p.prompt for p in u.test}


def test_an_unseen_client_with_nothing_to_evaluate_is_named_or_an_error(tmp_path):
    rows = [
        *_lonely_rows(),
        *({"prompt": f"u3 {i}", "chosen": "a", "rejected": "b", "user": "u3"} for i in range(8)),
    ]
    write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = dict(root=str(tmp_path), columns=ColumnMap(client="user"), heldout_fraction=0.25, eval_split=None)
    with pytest.raises(DataError, match=r"data.unseen_clients: no unseen client has both .*\(u2\)"):
        prepare_data(GenericData(**cfg, unseen_clients=["u2"]))  # its one pair is its labelled slice
    fed = prepare_data(GenericData(**cfg, unseen_clients=["u2", "u3"]))
    assert list(fed.unseen) == ["u3"] and list(fed.clients) == ["u1"]
    assert any(n.startswith("left out 1 unseen client(s)") and n.endswith(": u2") for n in fed.report.notes)
    assert (
        fed.report.dropped["pairs of unseen clients with no labelled slice or nothing left to evaluate"] == 1
    )


def test_the_pairs_a_cap_leaves_out_are_kept_apart_as_spare(tmp_path):
    whole = prepare_data(_planted(tmp_path))
    capped = prepare_data(_planted(tmp_path, max_train_pairs_per_client=5))
    for name, c in capped.clients.items():
        full = whole.clients[name]
        assert len(c.train) == 5 and c.spare and c.heldout == full.heldout and not full.spare
        # training and spare pairs: the uncapped training pairs, each once at most, none held out
        kept_prompts = {q.prompt for q in c.train}
        assert sorted(p.uid for p in c.train + c.spare) == sorted(
            p.uid for p in full.train if p.prompt not in kept_prompts or p in c.train
        )
        assert not {p.prompt for p in c.spare} & {p.prompt for p in c.heldout}
        assert not {p.prompt for p in c.spare} & {p.prompt for p in c.train}
