import pytest
import yaml

from fedbiscuit.config import ConfigError, apply_overrides, config_from_dict, dump_config, load_config


def _write(tmp_path, raw):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_overrides_reach_nested_keys_with_types(tmp_path):
    path = _write(tmp_path, {"data": {"source": "hh_rlhf"}, "train": {"lr": 1e-5, "steps": 10}})
    cfg = load_config(
        path, ["train.lr=1e-4", "data.root=../shared/data", "model.lora.r=16", "data.subsets=[helpful-base]"]
    )
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.data.root == "../shared/data"
    assert cfg.model.lora.r == 16
    assert cfg.data.subsets == ["helpful-base"]
    assert cfg.name == "c"  # defaults to the file's stem


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.lrr=1e-4", "train.lrr"),  # unknown key
        ("train.lr=fast", "train.lr"),  # wrong type
        ("model.lora.r=0", "model.lora.r"),  # impossible value
        ("data.subsets=[]", "data.subsets"),  # empty client list
        ("model.device=gpu0", "model.device"),
        ("data.partition.method=dirichlet", "num_clients"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, needle):
    path = _write(tmp_path, {"data": {"source": "hh_rlhf"}})
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    assert needle in str(err.value)


def test_wrong_value_is_shown(tmp_path):
    path = _write(tmp_path, {"data": {"source": "hh_rlhf"}})
    with pytest.raises(ConfigError, match="'fast'"):
        load_config(path, ["train.lr=fast"])


def test_missing_or_unknown_source_is_named():
    with pytest.raises(ConfigError, match="data.source"):
        config_from_dict({"data": {"root": "x"}})
    with pytest.raises(ConfigError, match="'hh'"):
        config_from_dict({"data": {"source": "hh"}})


def test_steps_and_epochs_are_exclusive():
    with pytest.raises(ConfigError, match="exactly one"):
        config_from_dict({"train": {"steps": 5, "epochs": 1}})
    assert config_from_dict({"train": {"steps": None, "epochs": 2}}).train.epochs == 2


def test_malformed_override_and_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"train": 3}, ["train.lr=1"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_dump_round_trips():
    cfg = config_from_dict(
        {"name": "x", "data": {"source": "generic", "root": "/d", "columns": {"client": "who"}}}
    )
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_shipped_configs_validate():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert configs, "no configs shipped"
    for path in configs:
        load_config(path)


def test_federated_constraints():
    with pytest.raises(ConfigError, match="min_clients=5 exceeds"):
        config_from_dict({"federated": {"clients_per_round": 4, "min_clients": 5}})
    with pytest.raises(ConfigError, match="heldout_fraction must be > 0"):
        config_from_dict(
            {
                "pipeline": "federated",
                "data": {"source": "hh_rlhf", "heldout_fraction": 0.0},
                "federated": {"algorithm": "fedbiscuit"},
            }
        )


def test_cached_selector_path_needs_top_layers():
    with pytest.raises(ConfigError, match="selector.path=cached needs model.lora.top_layers"):
        config_from_dict({"selector": {"path": "cached"}})
    cfg = config_from_dict({"selector": {"path": "cached"}, "model": {"lora": {"top_layers": 4}}})
    assert cfg.selector.path == "cached" and cfg.model.lora.top_layers == 4
    with pytest.raises(ConfigError, match="model.lora.top_layers"):
        config_from_dict({"model": {"lora": {"top_layers": 0}}})


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("data.unseen_clients=1.5", "must lie in (0, 1), got 1.5"),
        ("data.unseen_clients=0", "must lie in (0, 1), got 0"),
        ("data.unseen_clients=[]", "empty list"),
        ("data.unseen_clients=[a,b,a]", "names 'a' more than once"),
        ("data.unseen_clients=0.2 data.heldout_fraction=0", "data.heldout_fraction is 0"),
        ("federated.personalize_steps=-1", "federated.personalize_steps"),
        ("eval.min_client_pairs=0", "eval.min_client_pairs"),
    ],
)
def test_population_options_name_the_key_and_value(tmp_path, override, needle):
    path = _write(tmp_path, {"data": {"source": "hh_rlhf"}})
    with pytest.raises(ConfigError) as err:
        load_config(path, override.split())
    assert needle in str(err.value) and override.split()[0].rsplit("=")[0] in str(err.value)


def test_population_options_parse_from_the_command_line(tmp_path):
    from fedbiscuit.selector.metrics import MIN_CLIENT_PAIRS

    path = _write(tmp_path, {"data": {"source": "hh_rlhf"}, "pipeline": "federated"})
    assert load_config(path, ["data.unseen_clients=[helpful-base]"]).data.unseen_clients == ["helpful-base"]
    cfg = load_config(path, ["data.unseen_clients=0.25", "federated.personalize_steps=5"])
    assert cfg.data.unseen_clients == 0.25 and cfg.federated.personalize_steps == 5
    assert cfg.eval.min_client_pairs == MIN_CLIENT_PAIRS  # the config's default is the metrics' default


def test_personalising_a_centralized_pipeline_is_refused_with_the_alternative(tmp_path):
    path = _write(tmp_path, {"data": {"source": "hh_rlhf"}, "pipeline": "centralized"})
    with pytest.raises(ConfigError, match=r"personalize_steps=3.*federated.algorithm=centralized"):
        load_config(path, ["federated.personalize_steps=3"])


def test_a_centralized_pipeline_refuses_federated_settings_it_would_ignore(tmp_path):
    path = _write(tmp_path, {"data": {"source": "hh_rlhf"}, "pipeline": "centralized"})
    with pytest.raises(ConfigError, match=r"federated.rounds is set, but pipeline=centralized"):
        load_config(path, ["federated.rounds=12"])
    with pytest.raises(ConfigError, match=r"federated.algorithm is set"):
        load_config(path, ["federated.algorithm=fedbiscuit"])
    with pytest.raises(ConfigError, match=r"federated.fedbiscuit is set"):
        load_config(path, ["federated.fedbiscuit.num_selectors=3"])
    # the section's defaults (a run folder's config.yaml holds them all), and naming the algorithm the pipeline
    # runs, are not settings it ignores
    assert load_config(path).pipeline == "centralized"
    assert load_config(path, ["federated.rounds=10"]).federated.rounds == 10
    assert load_config(path, ["federated.algorithm=centralized"]).federated.algorithm == "centralized"


def test_a_grouping_rule_refuses_the_pair_count_of_another(tmp_path):
    from fedbiscuit.config import FedBiscuitConfig

    with pytest.raises(ValueError, match=r"gradient_pairs=32 applies to grouping=gradients"):
        FedBiscuitConfig(grouping="loss", gradient_pairs=32)
    with pytest.raises(ValueError, match=r"grouping_pairs=8 caps the held-out pairs"):
        FedBiscuitConfig(grouping="gradients", grouping_pairs=8)
    assert FedBiscuitConfig(grouping="gradients", gradient_pairs=32).gradient_pairs == 32
    assert FedBiscuitConfig(grouping="loss", grouping_pairs=8).grouping_pairs == 8


# the phase-2 baselines on the clients' own pairs, judged by the base model (kind=phase1 needs phase-1 selectors)
FEDDPO = {"pipeline": "rlhf", "rlhf": {"method": "feddpo", "judge": {"kind": "hf"}}}
FEDSFT = {"pipeline": "rlhf", "rlhf": {"method": "fedsft", "judge": {"kind": "hf"}}}
# phase 2 on the selectors of a finished run: phase 1 does not run
FROM_RUN = {"pipeline": "rlhf", "rlhf": {"selectors_from": "runs/x", "judge": {"kind": "hf"}}}


def _judged_by(kind: str) -> dict:
    return {"pipeline": "rlhf", "rlhf": {"judge": {"kind": kind}}}


@pytest.mark.parametrize(
    ("base", "override", "needle"),
    [
        # FedBiscuit's settings with another algorithm
        (
            {"pipeline": "federated"},
            "federated.fedbiscuit.num_selectors=3",
            r"fedbiscuit.num_selectors is set, but federated.algorithm=fedbis",
        ),
        (
            {"pipeline": "federated", "federated": {"algorithm": "oracle"}},
            "federated.fedbiscuit.warmup_rounds=2",
            r"algorithm=oracle has no clusters",
        ),
        # the loss rule's assignment with a direction-clustering rule
        (
            {
                "pipeline": "federated",
                "federated": {"algorithm": "fedbiscuit", "fedbiscuit": {"grouping": "gradients"}},
            },
            "federated.fedbiscuit.assignment=greedy",
            r"assignment=greedy assigns clients by held-out loss",
        ),
        # phase 2's settings without phase 2
        ({"pipeline": "federated"}, "rlhf.num_prompts=8", r"rlhf.num_prompts is set, but pipeline=federated"),
        ({"pipeline": "centralized"}, "rlhf.judge.kind=hf", r"rlhf.judge is set, but pipeline=centralized"),
        # the baselines on the clients' own pairs
        (
            FEDDPO,
            "rlhf.selectors_from=runs/x",
            r"rlhf.selectors_from is read by method=selectors only",
        ),
        (
            FEDSFT,
            "federated.algorithm=fedbiscuit",
            r"federated.algorithm=fedbiscuit: rlhf.method=fedsft",
        ),
        (
            FEDDPO,
            "rlhf.mode=iterative",
            r"rlhf.mode=iterative: rlhf.method=feddpo",
        ),
        (
            FEDDPO,
            "rlhf.dpo.epochs=2",
            r"rlhf.dpo.epochs=2.0 does nothing.*set rlhf.dpo.epochs=1",
        ),
        (
            FEDDPO,
            "rlhf.dpo.log_every=2",
            r"rlhf.dpo.log_every=2 does nothing",
        ),
        (
            FEDSFT,
            "rlhf.dpo.beta=0.5",
            r"rlhf.dpo.beta=0.5 does nothing.*SFT has no preference loss",
        ),
        (
            FEDDPO,
            "rlhf.best_of_n=8",
            r"rlhf.best_of_n=8: the best-of-n probe",
        ),
        (
            FEDSFT,
            "rlhf.generation.num_candidates=4",
            r"rlhf.generation.num_candidates does nothing",
        ),
        (
            FEDDPO,
            "rlhf.swap_average=false",
            r"rlhf.swap_average does nothing",
        ),
        # phase 1's settings where phase 1 does not run: a finished run's selectors, or a baseline
        (
            FROM_RUN,
            "federated.rounds=20",
            r"federated.rounds is set, but rlhf.selectors_from=runs/x reads selectors already trained",
        ),
        (FROM_RUN, "train.lr=0.01", r"train.lr is set, but rlhf.selectors_from=runs/x"),
        (FROM_RUN, "eval.before_training=false", r"eval.before_training is set, but rlhf.selectors_from"),
        (FEDDPO, "eval.heldout_every=5", r"eval.heldout_every is set, but rlhf.method=feddpo"),
        (FEDSFT, "train.batch_size=2", r"train.batch_size is set, but rlhf.method=fedsft trains no selector"),
        (
            FEDDPO,
            "train.schedule=linear",
            r"train.schedule is set, but rlhf.method=feddpo trains no selector",
        ),
        (FEDDPO, "federated.eval_every=3", r"federated.eval_every is set, but rlhf.method=feddpo"),
        (
            _judged_by("hf"),
            "federated.flower.num_clients=4",
            r"federated.flower.num_clients is set, but the Flower engine runs pipeline=federated only",
        ),
        (
            FEDDPO,
            "federated.personalize_steps=4",
            r"federated.personalize_steps is set, but rlhf.method=feddpo",
        ),
        # a judge's settings for another kind of judge
        (
            _judged_by("phase1"),
            "rlhf.judge.model=gpt-4o",
            r"rlhf.judge.model='gpt-4o' is read by judge.kind=hf or openai only",
        ),
        (
            _judged_by("hf"),
            "rlhf.judge.url=http://x",
            r"rlhf.judge.url='http://x' is read by judge.kind=openai only",
        ),
        (
            _judged_by("hf"),
            "rlhf.judge.timeout_s=5",
            r"rlhf.judge.timeout_s=5.0 is read by judge.kind=openai",
        ),
        (
            _judged_by("openai"),
            "rlhf.judge.template=dialogue",
            r"rlhf.judge.template='dialogue' is read by judge.kind=selector or hf",
        ),
        # a partition method's settings under another method
        (
            {},
            "data.partition.alpha=0.5",
            r"partition.alpha=0.5 applies to partition.method=dirichlet, not natural",
        ),
        (
            {"data": {"source": "hh_rlhf", "partition": {"method": "iid", "num_clients": 4}}},
            "data.partition.split_each=2",
            r"partition.split_each=2 applies to partition.method=natural, not iid",
        ),
        ({}, "data.partition.num_clients=4", r"partition.num_clients=4: method=natural"),
        (
            {"pipeline": "federated"},
            "train.log_every=2",
            r"train.log_every=2 sets a centralized run's loss history",
        ),
        # stores and files of another path or model
        ({}, "selector.cache_dir=/tmp/x", r"selector.cache_dir='/tmp/x' is the cached path's store"),
        ({}, "model.gguf_file=m.gguf", r"model.gguf_file='m.gguf' names a GGUF.*name_or_path=embedded"),
    ],
)
def test_settings_another_mode_reads_are_refused_not_ignored(tmp_path, base, override, needle):
    """A setting read only by another pipeline, algorithm, method, judge or partition is an error naming it."""
    raw = {"data": {"source": "hh_rlhf"}, **base}
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError, match=needle):
        load_config(path, [override])
    # the same section at its defaults (as a run folder's config.yaml names every key) still loads
    assert load_config(path).name == "c"


def test_settings_are_accepted_where_they_are_read(tmp_path):
    fb = _write(
        tmp_path,
        {"data": {"source": "hh_rlhf"}, "pipeline": "federated", "federated": {"algorithm": "fedbiscuit"}},
    )
    assert load_config(fb, ["federated.fedbiscuit.num_selectors=3"]).federated.fedbiscuit.num_selectors == 3
    assert (
        load_config(fb, ["federated.fedbiscuit.assignment=greedy"]).federated.fedbiscuit.assignment
        == "greedy"
    )
    central = _write(tmp_path, {"data": {"source": "hh_rlhf"}})
    assert load_config(central, ["eval.swap_average=false"]).eval.swap_average is False
    assert (
        load_config(
            central,
            ["data.partition.method=dirichlet", "data.partition.num_clients=4", "data.partition.alpha=0.5"],
        ).data.partition.alpha
        == 0.5
    )
    assert (
        load_config(
            central, ["selector.path=cached", "model.lora.top_layers=2", "selector.cache_dir=/tmp/x"]
        ).selector.cache_dir
        == "/tmp/x"
    )
    rl = _write(
        tmp_path, {"data": {"source": "hh_rlhf"}, "pipeline": "rlhf", "rlhf": {"judge": {"kind": "openai"}}}
    )
    cfg = load_config(rl, ["rlhf.judge.model=gpt-4o", "rlhf.judge.url=http://x", "rlhf.judge.timeout_s=5"])
    assert (cfg.rlhf.judge.model, cfg.rlhf.judge.timeout_s) == ("gpt-4o", 5.0)
    dpo = load_config(
        rl,
        [
            "rlhf.method=feddpo",
            "rlhf.judge.kind=hf",
            "rlhf.judge.model=null",
            "rlhf.judge.url=null",
            "rlhf.dpo.beta=0.5",
        ],
    )
    assert dpo.rlhf.dpo.beta == 0.5  # FedDPO reads beta
    assert (
        load_config(
            rl,
            [
                "rlhf.method=feddpo",
                "rlhf.judge.kind=hf",
                "rlhf.judge.model=null",
                "rlhf.judge.url=null",
                "rlhf.best_of_n=0",
            ],
        ).rlhf.best_of_n
        == 0
    )  # off: what it does
    # phase 1's settings where phase 1 runs (no selectors_from), and a baseline's rounds
    assert load_config(rl, ["federated.rounds=20", "train.lr=0.01"]).train.lr == 0.01
    baseline = ["rlhf.method=feddpo", "rlhf.judge.kind=hf", "rlhf.judge.model=null", "rlhf.judge.url=null"]
    assert load_config(rl, [*baseline, "federated.rounds=20"]).federated.rounds == 20


def test_one_order_is_refused_where_a_federated_run_starts_not_where_it_is_read(tmp_path):
    """eval.swap_average=false: `fedbiscuit eval` reads it for any config, a federated or phase-1 run would
    ignore it, so the runners refuse it (the local engine's and the Flower engine's), not the config."""
    from fedbiscuit.flower.server_app import check_flower_config
    from fedbiscuit.runner import run

    fed = _write(tmp_path, {"data": {"source": "hh_rlhf"}, "pipeline": "federated"})
    cfg = load_config(fed, ["eval.swap_average=false"])  # loads: an evaluation may read it
    assert cfg.eval.swap_average is False
    with pytest.raises(ConfigError, match=r"eval.swap_average=false: federated and phase-1"):
        run(cfg, quiet=True)
    with pytest.raises(ConfigError, match=r"eval.swap_average=false: federated and phase-1"):
        check_flower_config(cfg)


@pytest.mark.parametrize("base", [FROM_RUN, FEDDPO], ids=["selectors_from", "feddpo"])
def test_min_client_pairs_is_refused_where_a_phase2_run_without_selectors_starts(tmp_path, base):
    """eval.min_client_pairs: a phase-2 run that trains no selector computes no per-client agreement, but
    `fedbiscuit eval` reads it for any config, so the runner refuses it, not the config."""
    from fedbiscuit.config import check_phase2_reads_no_agreement
    from fedbiscuit.runner import run

    path = _write(tmp_path, {"data": {"source": "hh_rlhf"}, **base})
    cfg = load_config(path, ["eval.min_client_pairs=10"])  # loads: an evaluation may read it
    assert cfg.eval.min_client_pairs == 10
    with pytest.raises(ConfigError, match=r"eval.min_client_pairs=10: this phase-2 run \(rlhf\."):
        run(cfg, quiet=True)
    # phase 2 that trains its selectors first reads it (phase 1's evaluation)
    phase1 = _write(
        tmp_path, {"data": {"source": "hh_rlhf"}, "pipeline": "rlhf", "rlhf": {"judge": {"kind": "hf"}}}
    )
    check_phase2_reads_no_agreement(load_config(phase1, ["eval.min_client_pairs=10"]))


def test_unseen_clients_of_the_oracle_and_local_baselines_read_grouping_pairs(tmp_path):
    """An unseen client joins one of the baselines' several selectors by scoring grouping_pairs of its pairs
    (federated/population.py): there the setting is read; with FedBis's one selector it is not."""
    raw = {
        "data": {"source": "hh_rlhf", "unseen_clients": 0.25, "partition": {"split_each": 4}},
        "pipeline": "federated",
    }
    for algorithm in ("oracle", "local"):
        cfg = load_config(
            _write(tmp_path, raw),
            [f"federated.algorithm={algorithm}", "federated.fedbiscuit.grouping_pairs=8"],
        )
        assert cfg.federated.fedbiscuit.grouping_pairs == 8
    with pytest.raises(
        ConfigError, match=r"fedbiscuit.grouping_pairs is set, but federated.algorithm=fedbis"
    ):
        load_config(_write(tmp_path, raw), ["federated.fedbiscuit.grouping_pairs=8"])
    with pytest.raises(ConfigError, match=r"fedbiscuit.warmup_rounds is set, but federated.algorithm=oracle"):
        load_config(
            _write(tmp_path, raw), ["federated.algorithm=oracle", "federated.fedbiscuit.warmup_rounds=2"]
        )
