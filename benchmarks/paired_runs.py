"""Two finished runs judged on the same test pairs: the paired difference in agreement, per subset and overall.

Agreement intervals of two runs overlap long before their difference is undecidable: both are judged on the same
pairs, so the right test is paired (McNemar's exact test as the sign test of the per-pair differences, half
credit included, and a paired bootstrap for the interval of the difference). Each run's last checkpoint is scored again: a run with one selector by that
selector, a run with several (FedBiscuit) by each client's own cluster selector, as its evaluation did; the
recomputed agreement is printed beside the one the run logged, which checks that the same pairs are judged the
same way.

    python benchmarks/paired_runs.py --compare runs/hh_fedbis_3ep_s0 runs/hh_fedbiscuit_3ep_s0 \\
                                     --compare runs/hh_fedbis_3ep_s1 runs/hh_fedbiscuit_3ep_s1
    python benchmarks/paired_runs.py --compare untrained runs/hh_centralized_v2

A run is a federated run folder (its last round checkpoint) or a centralized one (its selector.safetensors);
"untrained" is the fresh adapter of the other run's config (LoRA starts as a no-op: the base model).

Comparisons of the same two arms in several seeds (run folders named ``<arm>_s<seed>``) are also pooled: per
pair the mean over the seeds, a paired bootstrap over the pairs and the sign test of the per-pair mean
differences. That interval is conditional on the seeds run (it does not sample seeds), and says so.
Each comparison prints what its two runs were trained with differently, read from their saved configs (the
data, model, selector, train and federated sections, less bookkeeping), not from their names; and two seeds of one
arm that were trained differently beyond the seed are not pooled, with the keys named.
``--reuse FILE`` adds the comparisons an earlier invocation wrote to its --json, without scoring them again, so
each seed's runs are scored once, as they finish:

    python benchmarks/paired_runs.py --compare untrained runs/a_s0 --json s0.json
    python benchmarks/paired_runs.py --compare untrained runs/a_s1 --reuse s0.json    # pooled over s0, s1

``--split heldout`` judges the clients' held-out slices of the training split instead of the test pairs: what a
choice between settings is made on (the runs must partition the data alike, as arms of one script do). Where the
arms differ in how many held-out pairs their groupings score, those pairs are not neutral; ``--split spare``
judges instead each client's training pairs that ``data.max_train_pairs_per_client`` left out (the first
``--spare-pairs`` in the cap's order), which neither training nor grouping reads; runs compared there need the
same cap (another cap leaves other pairs out).

The JSON keeps every run's per-pair outcomes, so other paired statistics need no rescoring. And each run's
per-pair outcomes are kept in ``paired/`` under the model cache (``model.cache_dir``, else ``$FEDBISCUIT_CACHE``, else
``~/.cache/fedbiscuit``), keyed by the
checkpoint file (path, size, modification time) and the config sections that decide the test pairs, so a run
compared again in a later invocation is not scored again (``--no-cache``: always score).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections import Counter
from pathlib import Path

from common import write_json

SAME = ("seed", "data", "model", "selector", "eval")  # what a workspace is opened from
UNTRAINED = "untrained"
SPARE_PAIRS = 100  # --split spare: pairs per client by default
# Settings that do not change what a run's selectors learn (training_settings leaves them out). Why the check:
# until session 19 benchmarks/fedbis_homogeneous.sh ran seeds of one arm under a config whose schedule had
# changed in between, and their pool mixed two recipes unnoticed.
BOOKKEEPING = {
    "data.root",
    "data.eval_split",  # what the test pairs are: checked on the pairs themselves
    "data.max_eval_pairs_per_client",
    "model.cache_dir",
    "federated.eval_every",
    "federated.checkpoint_every",
    "train.log_every",
}


def final_checkpoint(run: str) -> Path:
    """The file a run's final selector(s) are read from: a centralized run's selector.safetensors, else its
    last round checkpoint."""
    from fedbiscuit.federated.checkpoint import list_checkpoints
    from fedbiscuit.pipeline import SELECTOR

    folder = Path(run)
    single = folder / "checkpoints" / f"{SELECTOR}.safetensors"
    if single.is_file():
        return single
    ckpts = list_checkpoints(folder / "checkpoints")
    if not ckpts:
        sys.exit(f"{run}: neither checkpoints/{SELECTOR}.safetensors nor a round checkpoint")
    return ckpts[-1]


def cache_file(run: str, key: str, root: Path) -> Path:
    """Where a run's per-pair outcomes are kept: named by what decides them (the checkpoint file as it is now,
    and the config sections that decide the test pairs and how they are read), so a rewritten checkpoint or a
    changed config is scored again."""
    ident: list = [key]
    if run != UNTRAINED:
        ckpt = final_checkpoint(run).resolve()
        stat = ckpt.stat()
        ident += [str(ckpt), stat.st_size, stat.st_mtime_ns]
    digest = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]
    return root / "paired" / f"{digest}.json"


def final_selectors(run: str, untrained: dict, split: str = "test"):
    """(where from, {name: adapter state}, clusters, logged agreement, local) of a run's final selector(s);
    ``local``: the local baseline, every client its own selector.

    ``run``: a federated run folder (its last round checkpoint), a centralized one (checkpoints/selector.
    safetensors), or "untrained": the fresh adapter the workspace starts with (LoRA B = 0, the base model)."""
    from fedbiscuit.federated.checkpoint import load_checkpoint
    from fedbiscuit.models.adapters import read_adapter
    from fedbiscuit.pipeline import SELECTOR

    if run == UNTRAINED:
        return UNTRAINED, {UNTRAINED: untrained}, {}, None, False
    folder = Path(run)
    records = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    event = {"test": "eval", "heldout": "heldout"}.get(split)  # nothing is logged on the spare pairs
    evals = [r for r in records if r.get("event") == event]
    ckpt = final_checkpoint(run)
    if (
        ckpt.name == f"{SELECTOR}.safetensors"
    ):  # a centralized run: its "after" evaluation (held-out: last point)
        logged = (
            [r["overall"]["agreement"] for r in evals if r.get("stage") == "after"]
            if split == "test"
            else [r["agreement"] for r in evals]
        )
        return ckpt, {"selector": read_adapter(ckpt)[0]}, {}, logged[-1] if logged else None, False
    state = load_checkpoint(ckpt)
    clusters = state.clusters
    local = not clusters and _algorithm(folder) == "local"
    if local:  # the local baseline: every client its own selector
        clusters = {c: c for c in state.selectors}
    logged = [
        (r.get("own") or next(iter(r["selectors"].values())))["overall"]["agreement"]
        for r in evals
        if r.get("round") == state.round
    ]
    return ckpt, state.selectors, clusters, logged[-1] if logged else None, local


def _algorithm(folder: Path) -> str | None:
    import yaml

    config = folder / "config.yaml"
    return (
        yaml.safe_load(config.read_text()).get("federated", {}).get("algorithm") if config.is_file() else None
    )


def judged_pairs(ws, split: str, spare: int = SPARE_PAIRS) -> tuple[list, list]:
    """(encoded pairs owned by their client, the texts behind them) of the test split, the held-out slices, or
    the first ``spare`` pairs each client's cap left out."""
    if split == "test":  # test_pairs() encodes all_test() in this order
        return ws.test_pairs(), [t for members in ws.data.all_test().values() for t in members]
    texts = {
        name: (c.heldout if split == "heldout" else c.spare[:spare]) for name, c in ws.data.clients.items()
    }
    if not any(texts.values()):
        why = (
            "data.max_train_pairs_per_client left none out"
            if split == "spare"
            else "data.heldout_fraction is 0"
        )
        sys.exit(f"no {split} pairs to judge: {why}")
    pairs = [p for name, members in texts.items() for p in ws.encoder.encode(members, owner=name)]
    return pairs, [t for members in texts.values() for t in members]


def run_correct(ws, run: str, untrained: dict, split: str = "test", spare: int = SPARE_PAIRS):
    """Per judged pair: 1 / 0 / 0.5 for the run's final selector(s), each pair judged by its client's selector."""
    import torch

    from fedbiscuit.models.adapters import load_adapter_state
    from fedbiscuit.pipeline import SELECTOR
    from fedbiscuit.selector.metrics import pair_correct
    from fedbiscuit.selector.training import score_pairs

    ckpt, selectors, clusters, logged, local = final_selectors(run, untrained, split)
    pairs, texts = judged_pairs(ws, split, spare)
    names = list(selectors)
    if len(names) == 1:
        chosen = [names[0]] * len(pairs)
    else:
        missing = sorted({p.client for p in pairs} - set(clusters))
        if missing:
            sys.exit(
                f"{ckpt}: test clients without a cluster: {missing[:5]} (own-cluster agreement undefined)"
            )
        chosen = [clusters[p.client] for p in pairs]
    # as the run's own evaluation did (same batches, same numbers): every selector judges every pair, except
    # in the local baseline, where each client's selector judges that client's pairs only (16 times less work
    # at 16 clients)
    p_ab = torch.empty(len(pairs))
    p_ba = torch.empty(len(pairs))
    for name in sorted(set(chosen)):
        load_adapter_state(ws.model, SELECTOR, selectors[name], where=str(ckpt))
        mine = torch.tensor([c == name for c in chosen])
        judged = [p for p, m in zip(pairs, mine.tolist(), strict=True) if m] if local else pairs
        ab, ba = score_pairs(
            ws.model, ws.encoder, judged, ws.choice_ids, ws.cfg.eval.batch_size, both_orders=True
        )
        p_ab[mine], p_ba[mine] = (ab, ba) if local else (ab[mine], ba[mine])
    decided = [(p, t) for p, t in zip(pairs, texts, strict=True) if p.label != 0.5]
    correct = pair_correct(pairs, p_ab, p_ba)
    outcomes, seen = {}, Counter()
    for (p, t), c in zip(decided, correct, strict=True):
        key = pair_key(t)
        seen[key] += 1  # a pair repeated in the data is told apart by its occurrence
        outcomes[f"{key}:{seen[key]}"] = (float(c), p.client.split("#")[0])
    return ckpt, logged, outcomes


def arm(run: str) -> str:
    """A run's arm: its folder name without a trailing "_s<seed>" ("untrained" stays itself)."""
    return re.sub(r"_s\d+$", "", Path(run).name)


def training_settings(cfg) -> dict:
    """The settings that decide what a run's selectors learn, as dotted keys: its data, model, selector, train
    and federated sections, less bookkeeping (where data and the cache live, how often it evaluates and
    checkpoints, the Flower transport) and the seed. Two seeds of one arm must agree on every one of them."""

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    settings = flat(cfg.model_dump(mode="json", include={"data", "model", "selector", "train", "federated"}))
    return {
        k: v for k, v in settings.items() if k not in BOOKKEEPING and not k.startswith("federated.flower.")
    }


def settings_differ(many: list[dict | None]) -> dict[str, list]:
    """{key: its values} for each setting on which the given runs' training settings disagree (runs without
    known settings, the untrained selector or a comparison from an older --json, are left out)."""
    known = [s for s in many if s is not None]
    keys = sorted({k for s in known for k in s})
    return {k: [s.get(k) for s in known] for k in keys if len({json.dumps(s.get(k)) for s in known}) > 1}


def pair_key(pair) -> str:
    """A test pair's identity by content: two runs may partition and order the same pairs differently
    (a centralized run's clients are the subsets, a federated run's their parts)."""
    text = "\0".join([pair.prompt, pair.response_a, pair.response_b, repr(pair.label)])
    return hashlib.sha256(text.encode()).hexdigest()


def aligned(a: dict, b: dict, names: tuple[str, str]):
    """(a's outcomes, b's outcomes, subsets) on the same test pairs in one order, or exit saying how they differ."""
    import torch

    only_a, only_b = a.keys() - b.keys(), b.keys() - a.keys()
    if only_a or only_b:
        sys.exit(
            f"{names[0]} and {names[1]} are not judged on the same test pairs: {len(only_a)} pairs only in the "
            f"first, {len(only_b)} only in the second ({len(a.keys() & b.keys())} shared)"
        )
    keys = sorted(a)
    return (
        torch.tensor([a[k][0] for k in keys]),
        torch.tensor([b[k][0] for k in keys]),
        [a[k][1] for k in keys],
    )


def compare(a, b, subsets: list[str], seed: int = 0) -> dict:
    """The paired comparison overall and per subset, with each run's own 95% Wilson interval beside it."""
    from fedbiscuit.selector.metrics import paired_comparison, wilson_interval

    def both(x, y) -> dict:
        c = paired_comparison(x, y, seed=seed)
        c["before_ci95"] = list(wilson_interval(float(x.sum()), x.numel()))
        c["after_ci95"] = list(wilson_interval(float(y.sum()), y.numel()))
        return c

    out = {"overall": both(a, b)}
    for s in sorted(set(subsets)):
        idx = [i for i, x in enumerate(subsets) if x == s]
        out[s] = both(a[idx], b[idx])
    return out


def _ci(ci: list[float]) -> str:
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def fmt(c: dict) -> str:
    lo, hi = c["ci95"]
    test = f", McNemar p={c['mcnemar_p']:.2g}" if "mcnemar_p" in c else ""
    test += f", sign test p={c['sign_p']:.2g}" if "sign_p" in c else ""
    test += f", permutation p={c['permutation_p']:.2g}" if "permutation_p" in c else ""
    return (
        f"{100 * c['before']:.1f}% {_ci(c['before_ci95'])} -> {100 * c['after']:.1f}% {_ci(c['after_ci95'])}: "
        f"{100 * c['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]{test} (n={c['n']})"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", nargs=2, action="append", metavar=("BASELINE", "OTHER"), default=[])
    p.add_argument(
        "--reuse",
        action="append",
        default=[],
        metavar="JSON",
        help="comparisons an earlier run of this script wrote (--json): pooled with these, not scored again",
    )
    p.add_argument("--json", help="write the figures here too")
    p.add_argument("--no-cache", action="store_true", help="score every run again, even one scored before")
    p.add_argument(
        "--split",
        choices=["test", "heldout", "spare"],
        default="test",
        help="heldout: the clients' held-out slices of the training split (for choosing settings); spare: "
        "training pairs each client's cap left out (read by neither training nor grouping)",
    )
    p.add_argument(
        "--spare-pairs",
        type=int,
        default=None,
        help=f"--split spare: pairs per client (default {SPARE_PAIRS})",
    )
    args = p.parse_args()
    if not args.compare and not args.reuse:
        p.error("give at least one --compare or --reuse")
    if args.spare_pairs is not None and args.split != "spare":
        p.error(f"--spare-pairs={args.spare_pairs} applies to --split spare only")
    if args.spare_pairs is not None and args.spare_pairs < 1:
        p.error(f"--spare-pairs={args.spare_pairs} must be at least 1")
    args.spare_pairs = args.spare_pairs or SPARE_PAIRS

    import torch

    from fedbiscuit.config import load_config
    from fedbiscuit.models.adapters import adapter_state
    from fedbiscuit.models.loading import cache_root
    from fedbiscuit.pipeline import SELECTOR, open_workspace

    results, diffs = [], []
    # Each run is scored in a workspace opened with its own config (its own partition of the data), once
    # however many comparisons name it; the comparison then pairs the outcomes by test pair content, so a
    # centralized run and a federated one on the same test pairs compare directly.
    workspace: dict[str, tuple] = {}
    outcomes: dict[str, tuple] = {}
    for base, other in args.compare:
        runs = [base, other]
        folders = [Path(r) for r in runs if r != UNTRAINED]
        if not folders:
            sys.exit("compare needs at least one run folder")
        settings: list[dict | None] = []
        for i, run in enumerate(runs):
            cfg = load_config((Path(run) if run != UNTRAINED else folders[0]) / "config.yaml", [])
            settings.append(None if run == UNTRAINED else training_settings(cfg))
            key = json.dumps(cfg.model_dump(include=set(SAME), mode="json"), sort_keys=True)
            if run == UNTRAINED:  # the untrained selector of the other run's model: one per workspace
                run = runs[i] = f"{UNTRAINED}@{key}"
            if run in outcomes:
                continue
            # the split is part of the cache key (test keeps the key it always had)
            where = {"test": key, "heldout": f"{key}|heldout"}.get(
                args.split, f"{key}|spare{args.spare_pairs}"
            )
            cached = cache_file(run.split("@")[0], where, cache_root(cfg.model))
            if cached.is_file() and not args.no_cache:
                hit = json.loads(cached.read_text())
                outcomes[run] = (
                    hit["checkpoint"],
                    hit["logged"],
                    {k: tuple(v) for k, v in hit["outcomes"].items()},
                )
                source = f"from {cached}"
            else:
                if key not in workspace:
                    workspace.clear()  # one model in memory at a time
                    ws = open_workspace(cfg, quiet=False)
                    # the fresh adapter, before any load
                    workspace[key] = (ws, adapter_state(ws.model, SELECTOR))
                ws, untrained = workspace[key]
                ckpt, logged, got = outcomes[run] = run_correct(
                    ws, run.split("@")[0], untrained, args.split, args.spare_pairs
                )
                write_json(str(cached), {"checkpoint": str(ckpt), "logged": logged, "outcomes": got})
                source = "scored"
            ckpt, logged, got = outcomes[run]
            agreement = sum(v for v, _ in got.values()) / len(got)
            print(
                f"{run.split('@')[0]}: {Path(str(ckpt)).name}, agreement {100 * agreement:.2f}% on {len(got)} pairs"
                f" (logged {'-' if logged is None else f'{100 * logged:.2f}%'}; {source})"
            )
        a, b, subsets = aligned(outcomes[runs[0]][2], outcomes[runs[1]][2], (base, other))
        scored = [
            {
                "run": name,
                "checkpoint": str(outcomes[r][0]),
                "agreement": float(x.mean()),
                "logged": outcomes[r][1],
            }
            for name, r, x in ((base, runs[0], a), (other, runs[1], b))
        ]
        c = compare(a, b, subsets)
        print(f"{other} against {base}:")
        if None not in settings:  # what the two arms differ in, read from their configs, not their names
            differ = settings_differ(settings)
            print(
                "  trained with    "
                + ("; ".join(f"{k} {u} -> {v}" for k, (u, v) in differ.items()) or "the same settings")
            )
        for k, v in c.items():
            print(f"  {k:28s} {fmt(v)}")
        diffs.append((a, b))
        results.append(
            {
                "baseline": base,
                "other": other,
                "comparison": c,
                "runs": scored,
                "settings": {"baseline": settings[0], "other": settings[1]},
                # per test pair (sorted by pair key), so any other paired statistic can be computed later
                "outcomes": {"subsets": subsets, str(base): a.tolist(), str(other): b.tolist()},
            }
        )
    named = [tuple(c) for c in args.compare]
    for path in args.reuse:
        for comp in json.loads(Path(path).read_text())["comparisons"]:
            base, other = comp["baseline"], comp["other"]
            if (base, other) in named:  # a JSON written with --reuse holds the reused comparisons too
                print(f"{other} against {base}: in {path} again, counted once")
                continue
            o = comp["outcomes"]
            results.append(comp)
            diffs.append((torch.tensor(o[base]), torch.tensor(o[other])))
            named.append((base, other))
            print(f"{other} against {base}: from {path}")
    out = {"comparisons": results}
    # Comparisons of the same two arms (run names without their "_s<seed>" suffix) are pooled: per pair the
    # mean over the seeds, a paired bootstrap over pairs, and the sign test of the per-pair mean differences
    # (McNemar needs one outcome per pair; a pooled pair has one per seed). Conditional on the seeds run.
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (base, other) in enumerate(named):
        groups.setdefault((arm(base), arm(other)), []).append(i)
    pools = []
    for (base_arm, other_arm), members in groups.items():
        if len(members) < 2:
            continue
        if len({tuple(results[i]["outcomes"]["subsets"]) for i in members}) > 1:
            print(f"not pooled: {other_arm} against {base_arm} judges different test pairs across seeds")
            continue
        mixed = {
            name: settings_differ([results[i].get("settings", {}).get(side) for i in members])
            for name, side in ((base_arm, "baseline"), (other_arm, "other"))
        }
        if any(mixed.values()):
            said = "; ".join(
                f"{name}: {k} {' / '.join(map(str, v))}" for name, d in mixed.items() for k, v in d.items()
            )
            print(
                f"not pooled: {other_arm} against {base_arm}: the seeds of one arm were trained differently ({said})"
            )
            continue
        a = torch.stack([diffs[i][0] for i in members]).mean(0)
        b = torch.stack([diffs[i][1] for i in members]).mean(0)
        pooled = {}
        for k, v in compare(a, b, results[members[0]]["outcomes"]["subsets"]).items():
            v["sign_p"] = v.pop("mcnemar_p")
            pooled[k] = v
        print(
            f"{other_arm} against {base_arm}, pooled over {len(members)} seeds (per pair the mean; conditional on them):"
        )
        for k, v in pooled.items():
            print(f"  {k:28s} {fmt(v)}")
        pools.append({"baseline": base_arm, "other": other_arm, "seeds": len(members), "pooled": pooled})
    out["pools"] = pools
    if len(pools) == 1:
        out["pooled"] = pools[0]["pooled"]
    write_json(args.json, out)


if __name__ == "__main__":
    main()
