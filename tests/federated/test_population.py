"""Unseen clients and the personalisation baseline, end to end on the tiny model and planted preferences
(even clients prefer "yes", odd ones "no")."""

import gc
import json
import weakref
from pathlib import Path

import pytest

from fedbiscuit.config import config_from_dict
from fedbiscuit.data.synthetic import planted_run_config
from fedbiscuit.federated import population
from fedbiscuit.federated.checkpoint import list_checkpoints, load_checkpoint
from fedbiscuit.federated.client import SelectorClient
from fedbiscuit.pipeline import run_federated

UNSEEN = ["client-2", "client-5"]  # one of each planted group


def _cfg(tmp_path: Path, name: str, unseen=UNSEEN, **fed) -> dict:
    raw = planted_run_config(tmp_path, name, clients=10, **fed)
    raw["data"]["unseen_clients"] = unseen
    return raw


def _records(result: dict) -> list[dict]:
    return [json.loads(x) for x in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]


def _fedbiscuit(tmp_path, name="fb", **fed):
    return _cfg(
        tmp_path,
        name,
        algorithm="fedbiscuit",
        rounds=10,
        clients_per_round=4,
        local_steps=3,
        fedbiscuit={"num_selectors": 2, "warmup_rounds": 2, "regroup_every": 2},
        **fed,
    )


def test_unseen_clients_never_train_and_join_the_selector_of_their_planted_group(tmp_path):
    result = run_federated(config_from_dict(_fedbiscuit(tmp_path)), quiet=True)
    records = _records(result)
    # never trained, never grouped, never sampled
    rounds = [r for r in records if r["event"] == "round"]
    assert rounds and not {c["client"] for r in rounds for c in r["clients"]} & set(UNSEEN)
    groupings = [r for r in records if r["event"] == "grouping"]
    assert groupings and all(not set(g["assignment"]) & set(UNSEEN) for g in groupings)
    assert all(not set(g["losses"]) & set(UNSEEN) for g in groupings)
    (data,) = [r for r in records if r["event"] == "data"]
    assert not set(data["clients"]) & set(UNSEEN) and len(data["clients"]) == 8
    assert data["unseen"] == {
        "client-2": {"labelled": 3, "remaining": 6},
        "client-5": {"labelled": 7, "remaining": 6},
    }
    clusters = load_checkpoint(list_checkpoints(Path(result["run_dir"]) / "checkpoints")[-1]).clusters
    assert sorted(clusters) == sorted(f"client-{i}" for i in range(10) if f"client-{i}" not in UNSEEN)
    assert not set(result["final"]["own"]["clients"]) & set(UNSEEN)  # nor in the seen clients' evaluation

    # the planted groups were found, and each unseen client joins the selector of its own group
    even = {s for c, s in clusters.items() if int(c.split("-")[1]) % 2 == 0}
    odd = {s for c, s in clusters.items() if int(c.split("-")[1]) % 2 == 1}
    assert len(even) == len(odd) == 1 and even != odd
    (unseen,) = [r for r in records if r["event"] == "unseen"]
    assert result["unseen"] == unseen  # the summary carries the logged record
    assert unseen["assignment"] == {"client-2": even.pop(), "client-5": odd.pop()}
    for client, joined in unseen["assignment"].items():
        losses = unseen["losses"][client]
        assert losses[joined] < min(v for s, v in losses.items() if s != joined)  # the lower loss, clearly
    own, vote = unseen["own"], unseen["vote"]
    assert own["overall"]["n"] == 12 and own["overall"]["agreement"] == 1.0
    assert own["fairness"]["clients"] == 2 and own["fairness"]["worst"] == 1.0
    # the two selectors disagree on every pair, so their vote is the mean probability: no better than chance
    assert vote["overall"]["agreement"] < 0.7
    assert set(unseen["selectors"]) == {"selector-0", "selector-1"}
    assert sorted(own["clients"]) == UNSEEN


def test_personalisation_serves_the_clients_the_global_selector_does_not(tmp_path):
    # test prompts the clients never trained on: personalising must generalise, not memorise
    raw = _cfg(
        tmp_path, "pers", rounds=10, clients_per_round=4, local_steps=3, personalize_steps=6, test_pairs=6
    )
    result = run_federated(config_from_dict(raw), quiet=True)
    final = result["final"]["selectors"]["selector-0"]
    # one FedAvg selector for two opposite groups sides with one group: about half right, worst client at 0
    assert 0.3 <= final["overall"]["agreement"] <= 0.7 and final["fairness"]["worst"] <= 0.2
    p = result["personalized"]
    assert p["steps"] == 6 and p["seen"]["selector"] == {
        c: "selector-0" for c in result["final"]["selectors"]["selector-0"]["clients"]
    }
    seen, unseen = p["seen"], p["unseen"]
    assert seen["global"]["overall"]["agreement"] == pytest.approx(final["overall"]["agreement"])
    assert seen["personalized"]["overall"]["agreement"] >= 0.95
    assert (
        seen["personalized"]["fairness"]["worst"] >= 0.8 and seen["personalized"]["fairness"]["clients"] == 8
    )
    assert seen["paired"]["n"] == 48 and seen["paired"]["lost"] == 0 and seen["paired"]["mcnemar_p"] < 1e-4
    # unseen clients fine-tune on their labelled slice alone (3 and 6 pairs) and are judged on their other pairs
    assert result["unseen"]["own"]["fairness"]["worst"] <= 0.2
    assert unseen["global"]["overall"]["n"] == unseen["personalized"]["overall"]["n"] == 12
    assert unseen["personalized"]["overall"]["agreement"] >= 0.9
    assert seen["skipped"] == unseen["skipped"] == {}


def test_no_personalised_copy_outlives_its_evaluation(tmp_path, monkeypatch):
    alive: list[weakref.ref] = []
    real = SelectorClient.train

    def spy(self, model, state, cfg, steps, *a, **kw):
        if steps == 4:  # personalisation (the rounds train 2 steps)
            gc.collect()
            assert all(ref() is None for ref in alive), (
                "an earlier client's personalised adapter is still held"
            )
        reply = real(self, model, state, cfg, steps, *a, **kw)
        if steps == 4:
            alive.append(weakref.ref(next(iter(reply.state.values()))))
        return reply

    monkeypatch.setattr(SelectorClient, "train", spy)
    run_federated(config_from_dict(_cfg(tmp_path, "mem", rounds=2, personalize_steps=4)), quiet=True)
    assert len(alive) == 10  # 8 seen clients, then 2 unseen


def test_a_resumed_run_still_evaluates_the_populations_once(tmp_path, monkeypatch):
    raw = _cfg(tmp_path, "res", rounds=2, personalize_steps=2)
    real = population.after_training
    monkeypatch.setattr(
        population, "after_training", lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt)
    )
    with pytest.raises(KeyboardInterrupt):  # killed after the last checkpoint, before the populations
        run_federated(config_from_dict(raw), quiet=True)
    monkeypatch.setattr(population, "after_training", real)
    result = run_federated(config_from_dict(raw), quiet=True, resume=True)
    assert result["unseen"] and result["personalized"]
    again = run_federated(config_from_dict(raw), quiet=True, resume=True)  # a finished run, resumed again
    kinds = [r["event"] for r in _records(again)]
    assert kinds.count("unseen") == kinds.count("personalized") == 1
    assert again["unseen"]["assignment"] == result["unseen"]["assignment"]
    assert (
        again["personalized"]["seen"]["paired"] == result["personalized"]["seen"]["paired"]
    )  # replayed exactly


@pytest.mark.parametrize("algorithm", ["local", "centralized"])
def test_the_baselines_evaluate_unseen_clients_and_personalise(tmp_path, algorithm):
    raw = _cfg(tmp_path, algorithm, algorithm=algorithm, rounds=2, personalize_steps=1)
    result = run_federated(config_from_dict(raw), quiet=True)
    selectors = set(load_checkpoint(list_checkpoints(Path(result["run_dir"]) / "checkpoints")[-1]).selectors)
    assert set(result["unseen"]["assignment"]) == set(UNSEEN)
    assert set(result["unseen"]["assignment"].values()) <= selectors
    seen = result["personalized"]["seen"]
    assert len(seen["selector"]) == 8 and set(seen["selector"].values()) <= selectors
    if algorithm == "local":  # every client starts from its own selector; unseen ones choose among all eight
        assert (
            seen["selector"] == {c: c for c in seen["selector"]} and len(result["unseen"]["selectors"]) == 8
        )


def test_the_flower_engine_refuses_what_only_the_local_engine_evaluates(tmp_path):
    from fedbiscuit.flower.server_app import check_flower_config

    with pytest.raises(ValueError, match=r"data.unseen_clients=\['client-2', 'client-5'\].*local engine"):
        check_flower_config(config_from_dict(_cfg(tmp_path, "f")))
    with pytest.raises(ValueError, match="federated.personalize_steps=3.*local engine"):
        check_flower_config(config_from_dict(_cfg(tmp_path, "g", unseen=None, personalize_steps=3)))


def test_a_finished_run_can_be_personalised_afterwards_on_resume(tmp_path):
    raw = _cfg(tmp_path, "later", rounds=2)
    first = run_federated(config_from_dict(raw), quiet=True)
    assert "personalized" not in first or not first["personalized"]
    raw["federated"]["personalize_steps"] = 3  # allowed on resume: it changes nothing the rounds computed
    again = run_federated(config_from_dict(raw), quiet=True, resume=True)
    assert again["personalized"]["seen"]["personalized"]["overall"]["n"] > 0
    assert again["unseen"]["assignment"] == first["unseen"]["assignment"]


def test_with_one_selector_nobody_scores_to_choose_it(tmp_path, monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("a client scored a single selector")

    monkeypatch.setattr(SelectorClient, "score", refuse)
    result = run_federated(config_from_dict(_cfg(tmp_path, "one", rounds=2, personalize_steps=1)), quiet=True)
    assert result["unseen"]["assignment"] == dict.fromkeys(UNSEEN, "selector-0")
    assert result["unseen"]["unscored"] == {} and result["personalized"]["seen"]["skipped"] == {}
