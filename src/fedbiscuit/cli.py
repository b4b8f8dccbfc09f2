"""The `fedbiscuit` command: run, data, eval. Thin: parse, call the pipeline, print."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .config import ConfigError, load_config
from .data.pairs import DataError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Federated RLHF with aggregated client preferences."
)
console = Console()
err_console = Console(stderr=True)

_OVERRIDES = typer.Argument(None, help="dotted overrides, e.g. train.lr=1e-4 data.root=../shared/data")
_QUIET = typer.Option(False, "--quiet", "-q", help="no progress bars")


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


def _load(config: Path, overrides: list[str] | None):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # raised inside transformers when peft asks about gradient checkpointing; nothing a user can act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        return load_config(config, overrides)
    except ConfigError as err:
        _fail(str(err))


def _guard(fn):
    """Known input problems end with their message, not a traceback."""
    from .federated.local_engine import TooFewClientsError
    from .models.adapters import AdapterMismatchError
    from .models.loading import ModelLoadError
    from .runs import RunExistsError
    from .selector.prompts import TemplateError

    known = (
        ValueError,
        ConfigError,
        DataError,
        ModelLoadError,
        AdapterMismatchError,
        TemplateError,
        FileNotFoundError,
        RunExistsError,
        TooFewClientsError,
    )
    try:
        return fn()
    except known as err:
        _fail(str(err))


def _pct(x) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}%"


def _num(x) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}"


def _agreement_table(title: str, reports: dict[str, dict]) -> Table:
    table = Table(title=title)
    table.add_column("client")
    table.add_column("pairs", justify="right")
    for stage in reports:
        table.add_column(f"{stage}: agree", justify="right")
        table.add_column("A|B / B|A", justify="right")
        table.add_column("Brier", justify="right")
    first = next(iter(reports.values()))
    for name in [*first["clients"], "overall"]:
        row = [name, str((first["overall"] if name == "overall" else first["clients"][name])["n"])]
        for rep in reports.values():
            r = rep["overall"] if name == "overall" else rep["clients"][name]
            row += [
                _pct(r["agreement"]),
                f"{_pct(r.get('agreement_ab'))} / {_pct(r.get('agreement_ba'))}",
                f"{r['brier']:.3f}",
            ]
        table.add_row(*row, style="bold" if name == "overall" else None)
    return table


def _federated_summary(results: dict) -> None:
    final, first = results["final"] or {"selectors": {}}, results.get("first") or {}
    table = Table(title=f"agreement with human labels after {results['rounds']} rounds (evaluation split)")
    for col in ("selector", "start", "end", "A|B / B|A"):
        table.add_column(col, justify="left" if col == "selector" else "right")
    rows = [(name, name, rep) for name, rep in final["selectors"].items()]
    rows += [
        (key, label, final[key])
        for key, label in (("vote", "majority vote"), ("own", "own cluster"))
        if key in final
    ]
    # 'start' is the evaluation before any training (round 0), not the first of several along the way
    before = first.get("round") == 0 and final.get("round") != 0
    for key, label, rep in rows:
        start = (first.get("selectors", {}).get(key) or first.get(key)) if before else None
        o = rep["overall"]
        table.add_row(
            label,
            _pct(start["overall"]["agreement"]) if start else "-",
            _pct(o["agreement"]),
            f"{_pct(o.get('agreement_ab'))} / {_pct(o.get('agreement_ba'))}",
        )
    if rows:
        console.print(table)
        console.print(_learned_sentence(rows, first if before else {}))
        if results.get("paired"):
            who = {"own": "each client's own cluster selector", "vote": "the selectors' vote"}
            console.print(
                f"paired on the test pairs, {who.get(results['paired']['measured_by'], 'the selector')} against "
                f"the untrained one: " + _paired_sentence(results["paired"], "federated selectors")
            )
    else:
        console.print("the selectors were not evaluated (no evaluation split: set data.eval_split)")
    _clusters("cluster of", results["clusters"])
    _population_summary(results)
    if results["faults"]:
        console.print(f"clients left out of rounds, by reason: {results['faults']}")
    console.print(
        "'start' is before any training, 'end' after the last round; 50% is chance.\n"
        f"files: {results['run_dir']}/ (config.yaml, metrics.jsonl, checkpoints/); "
        f"plots and a table: fedbiscuit report {results['run_dir']}"
    )


def _clusters(what: str, assignment: dict[str, str] | None) -> None:
    by_selector: dict[str, list[str]] = {}
    for client, selector in sorted((assignment or {}).items()):
        by_selector.setdefault(selector, []).append(client)
    for selector, members in sorted(by_selector.items()):
        console.print(f"  {what} {selector}: {', '.join(members)}")


def _population_summary(results: dict) -> None:
    """Seen and unseen clients side by side, personalised copies beside them, and how evenly each is served."""
    from .report import fairness, populations

    unseen, personalized = results.get("unseen"), results.get("personalized")
    rows = populations(results["final"], unseen, personalized)
    if not rows:
        return
    min_pairs = fairness(rows[0][2])["min_pairs"]
    table = Table(
        title=f"per client (%): agreement on each client's own pairs; mean, worst, p10 and spread over the n "
        f"clients with >= {min_pairs} pairs",
        box=None,  # 80 columns hold it
        pad_edge=False,
    )
    table.add_column("clients (judged by)", no_wrap=True)
    for col in ("n", "pairs", "agree", "95% CI", "mean", "worst", "p10", "spread"):
        table.add_column(col, justify="right", no_wrap=True)
    labels = [p if "personalised" in p else f"{p} ({by})" for p, by, _ in rows]  # personalised: own copies
    for label, (_, _, rep) in zip(labels, rows, strict=True):
        o, f = rep["overall"], fairness(rep)
        lo, hi = o["ci95"]
        table.add_row(
            label,
            str(f["clients"]) + (f"+{f['left_out']}" if f["left_out"] else ""),
            str(o["n"]),
            _num(o["agreement"]),
            f"{_num(lo)}-{_num(hi)}",
            _num(f["mean"]),
            _num(f["worst"]),
            _num(f["p10"]),
            _num(f["spread"]),
        )
    console.print(table)
    worst = (
        f"{label} {fairness(rep)['worst_client'] or '-'}"
        for label, (_, _, rep) in zip(labels, rows, strict=True)
    )
    console.print("  worst client: " + "; ".join(worst))
    if unseen:
        _clusters("unseen clients joined", unseen["assignment"])
        if unseen["unscored"]:
            console.print(f"  unseen clients that could not score the selectors: {unseen['unscored']}")
    for population in ("seen", "unseen"):
        part = (personalized or {}).get(population) or {}
        if "paired" in part:
            p = part["paired"]
            lo, hi = p["ci95"]
            console.print(
                f"personalising {personalized['steps']} steps, {population} clients: {_pct(p['before'])} -> "
                f"{_pct(p['after'])} on the same {p['n']} pairs (difference {100 * p['difference']:+.1f} points, "
                f"95% interval {100 * lo:+.1f} to {100 * hi:+.1f}; McNemar p={p['mcnemar_p']:.2g})"
            )
        if part.get("skipped"):
            console.print(f"  {population} clients not personalised: {part['skipped']}")
    note = (
        "'mean' averages clients, each counted once; 'spread' is the best client minus the worst; 'n+k': k more "
        "clients had too few pairs to count."
    )
    if unseen:
        note += (
            " Unseen clients never trained: each joined the selector with the lowest loss on its labelled "
            "(held-out) slice and is judged on its other pairs."
        )
    console.print(note)


def _learned_sentence(rows, first: dict) -> str:
    """One sentence a newcomer understands: did the selectors learn what these people prefer?"""
    by_key = {k: (k, label, rep) for k, label, rep in rows}
    # FedBiscuit: each client judged by its own cluster's selector; else the vote; else the one selector
    key, label, rep = by_key.get("own") or by_key.get("vote") or rows[0]
    o = rep["overall"]
    if not o.get("n"):
        return "no test pairs were evaluated (data.eval_split is unset or empty): nothing to say about agreement."
    lo, hi = o.get("ci95") or (float("nan"), float("nan"))
    start = first.get("selectors", {}).get(key) or first.get(key)
    before = f", {_pct(start['overall']['agreement'])} before training" if start else ""
    what = "each client's own selector" if key == "own" else label
    head = f"{what} sides with the human raters on {_pct(o['agreement'])} of {o['n']} test pairs it never trained on "
    head += f"(95% interval {_pct(lo)} to {_pct(hi)}{before}; 50% is a coin flip): "
    if lo > 0.5:
        return "[bold]" + head + "it has learned something of what these people prefer.[/]"
    return "[bold]" + head + "not measurably better than chance at this size.[/]"


def _win(rep: dict) -> str:
    lo, hi = rep["ci95"]
    return (
        f"{_pct(rep['win_rate'])} [{_pct(lo)}, {_pct(hi)}] "
        f"({rep['wins']} wins, {rep['ties']} ties, {rep['losses']} losses of {rep['prompts']}; "
        f"orders averaged: {_pct(rep['averaged_win_rate'])})"
    )


def _rlhf_summary(results: dict) -> None:
    if results.get("phase1"):
        _federated_summary(results["phase1"])
    if "labels" in results:
        lab = results["labels"]
        console.print(
            f"labelled {lab['pairs']} candidate pairs ({lab['first_won']} won by the first candidate, "
            f"{lab['second_won']} by the second; {lab['undecided']} undecided, {lab['identical']} identical "
            f"skipped); selectors disagreed on {_pct(lab['disagreement'])}"
        )
    d = results["dpo"]
    console.print(
        f"{'DPO' if results['method'] == 'selectors' else results['method']}: {d['steps']} steps in "
        f"{d['seconds']:.0f} s, loss {d['loss']:.4f}, "
        f"reward accuracy {_pct(d['reward_accuracy'])}, reward margin {d['reward_margin']:+.4f}"
    )
    table = Table(title=f"win rate against the reference answers (judge: {results['final']['judge']})")
    for col in ("policy", "win rate [95% CI]", "mean answer tokens"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for key in ("initial", "final"):
        rep = results[key]
        table.add_row(rep["label"], _win(rep), f"{rep['mean_new_tokens']:.1f}")
    console.print(table)
    if "best_of_n" in results:
        b = results["best_of_n"]
        console.print(
            f"best-of-{b['n']} probe on {b['prompts']} prompts: the selectors' pick wins "
            f"{_win(b['pick_vs_reference'])}; the first sample wins {_win(b['first_vs_reference'])}; "
            f"tokens {b['pick_mean_new_tokens']:.1f} (pick) vs {b['first_mean_new_tokens']:.1f} (first)"
        )
        console.print(
            "  best-of-n curve, judge / selectors: "
            + "; ".join(
                f"n={c['n']} {100 * c['judge']:.0f}% / {100 * c['selectors']:.0f}%" for c in b["curve"]
            )
        )
    if "curve" in results:
        console.print(
            "along DPO (step: log-ratio, judge / selectors): "
            + "; ".join(
                f"{c['step']}: {c['log_ratio']:.2f} nats, {100 * c['judge']:.0f}% / {100 * c['selectors']:.0f}%"
                for c in results["curve"]
            )
        )
    secs = results["seconds"]
    console.print(
        "How to read this: a win rate is judged in both orders (a prompt is a tie when the judge changes its "
        "mind with the order; 'orders averaged' instead averages the two verdicts first, which still reads a "
        "position-biased judge); 50% means no difference from the reference. The 'initial policy' row is the "
        "untuned model against itself: its distance from 50% is the noise at this many prompts. A pick that "
        "wins the selectors' vote but not the judge, or answers that grow longer without winning more, are "
        f"signs of reward hacking.\njudge: {results['judge']}\n"
        f"time: {secs['total']:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items() if k != "total")
        + f")\nfiles: {results['run_dir']}/ (config.yaml, metrics.jsonl, checkpoints/policy.safetensors); "
        f"report with plots: {results['report']}"
    )


@app.command()
def run(
    config: Path,
    overrides: list[str] | None = _OVERRIDES,
    quiet: bool = _QUIET,
    resume: bool = typer.Option(False, "--resume", help="continue the run from its newest checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier run of the same name"),
) -> None:
    """Run the pipeline the config describes; writes runs/<name>/."""
    from .runner import run as run_pipeline

    cfg = _load(config, overrides)
    console.print(
        f"run [bold]{cfg.name}[/]: pipeline={cfg.pipeline}, model={cfg.model.name_or_path}, "
        f"data={cfg.data.source} -> {cfg.run_dir}"
    )
    results = _guard(lambda: run_pipeline(cfg, quiet=quiet, resume=resume, overwrite=overwrite))
    from . import distributed

    if not distributed.is_main():  # a data-parallel helper process: rank 0 reports
        return
    if cfg.pipeline == "federated":
        _federated_summary(results)
        return
    if cfg.pipeline == "rlhf":
        _rlhf_summary(results)
        return
    stages = {k: results[k] for k in ("before", "after") if k in results}
    console.print(_agreement_table("selector agreement with human labels (evaluation split)", stages))
    t = results["train"]
    if "paired" in results:
        console.print(_paired_sentence(results["paired"]))
    if "after" in results:
        console.print(f"seen clients, {_fairness_sentence(results['after']['fairness'])}")
    if "unseen" in results:
        o = results["unseen"]["own"]["overall"]
        lo, hi = o["ci95"]
        console.print(
            f"unseen clients (never trained): {_pct(o['agreement'])} of {o['n']} pairs (95% interval {_pct(lo)} "
            f"to {_pct(hi)}); {_fairness_sentence(results['unseen']['own']['fairness'])}"
        )
    curve = results.get("heldout_curve") or []
    if len(curve) > 1:
        points = ", ".join(f"{c['pairs_seen']}: {100 * c['agreement']:.1f}%" for c in curve)
        console.print(
            f"held-out slice of the training split (n={curve[-1]['n']}), agreement by pairs seen: {points}"
        )
    console.print(
        f"trained {t['steps']} steps in {t['seconds']:.0f} s (final train loss {t['loss']:.4f}). "
        "'agree' averages both presentation orders; 'A|B / B|A' is each order alone, so a gap between them is "
        "position bias. 50% is chance.\n"
        f"files: {results['run_dir']}/ (config.yaml, metrics.jsonl, run.log), selector: {results['checkpoint']}"
    )


def _fairness_sentence(f: dict) -> str:
    small = f" ({f['left_out']} with fewer pairs left out)" if f["left_out"] else ""
    return (
        f"{f['clients']} with >= {f['min_pairs']} pairs{small}: mean over clients {_pct(f['mean'])}, worst "
        f"{_pct(f['worst'])} ({f['worst_client'] or '-'}), p10 {_pct(f['p10'])}, spread {_pct(f['spread'])}"
    )


def _paired_sentence(p: dict, trained: str = "the trained selector") -> str:
    lo, hi = p["ci95"]
    verdict = (
        f"{trained} agree{'' if trained.endswith('s') else 's'} with people measurably more often than the "
        "untrained one"
        if lo > 0 and p["mcnemar_p"] < 0.05
        else "the difference from the untrained selector is within noise"
        if lo <= 0 <= hi
        else f"{trained} agree{'' if trained.endswith('s') else 's'} with people measurably LESS often than the "
        "untrained one"
    )
    return (
        f"[bold]{verdict}[/]: {100 * p['before']:.1f}% -> {100 * p['after']:.1f}% on the same {p['n']} test pairs, "
        f"difference {100 * p['difference']:+.1f} points (95% interval {100 * lo:+.1f} to {100 * hi:+.1f}; "
        f"McNemar p={p['mcnemar_p']:.2g})."
    )


@app.command()
def data(config: Path, overrides: list[str] | None = _OVERRIDES) -> None:
    """Print the clients the config's data yields, their sizes, and every dropped row by reason."""
    from .data import prepare_data

    cfg = _load(config, overrides)
    fed = _guard(lambda: prepare_data(cfg.data, seed=cfg.seed))
    table = Table(title=f"{cfg.data.source} clients (partition: {cfg.data.partition.method})")
    for col in ("client", "train", "held-out", cfg.data.eval_split or "eval"):
        table.add_column(col, justify="left" if col == "client" else "right")
    for name, c in fed.clients.items():
        table.add_row(name, str(len(c.train)), str(len(c.heldout)), str(len(c.test)))
    for name, held in fed.report.skipped.items():  # no training pairs: left out of the run
        table.add_row(f"{name} (skipped)", "0", str(held), str(len(fed.eval_only.get(name, []))), style="dim")
    for name, pairs in fed.eval_only.items():
        if name not in fed.report.skipped:
            table.add_row(name, "0", "0", str(len(pairs)))
    for name, c in fed.unseen.items():  # never trained: its labelled slice, then every other pair it has
        table.add_row(f"{name} (unseen)", "0", str(len(c.heldout)), str(len(c.test)), style="italic")
    table.add_row(
        "total",
        str(sum(len(c.train) for c in fed.clients.values())),
        str(sum(len(c.heldout) for c in fed.clients.values())),
        str(sum(len(p) for p in fed.all_test().values())),
        style="bold",
    )
    console.print(table)
    if fed.unseen:
        console.print(
            "unseen clients take no part in training: 'held-out' is the labelled slice they choose a selector "
            "with, the last column all their other pairs (both splits); the total counts the seen clients"
        )
    for label, rep in ((cfg.data.train_split, fed.report), (cfg.data.eval_split, fed.eval_report)):
        if rep is None:
            continue
        kept = sum(rep.kept.values())
        dropped = ", ".join(f"{reason}: {n}" for reason, n in sorted(rep.dropped.items())) or "none"
        console.print(f"[bold]{label}[/]: kept {kept} pairs; dropped {sum(rep.dropped.values())} ({dropped})")
        for note in rep.notes:
            console.print(f"  note: {note}")


@app.command("eval")
def eval_(
    config: Path,
    overrides: list[str] | None = _OVERRIDES,
    checkpoint: Path | None = typer.Option(
        None, help="adapter file; default: the run's checkpoints/selector.safetensors"
    ),
    quiet: bool = _QUIET,
    json_out: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Evaluate a saved selector's agreement with human labels on the config's evaluation split."""
    from .pipeline import evaluate_checkpoint

    cfg = _load(config, overrides)
    report = _guard(lambda: evaluate_checkpoint(cfg, checkpoint, quiet=quiet))
    if json_out:
        json.dump(report, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        console.print(_agreement_table(f"agreement of {report['checkpoint']}", {"selector": report}))


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="one or more run folders (runs/<name>)"),
    out: Path | None = typer.Option(
        None, help="where to write report.md and the PNGs; default: the first run"
    ),
) -> None:
    """Plots (agreement against round, cluster of each client over time) and a Markdown table of the runs."""
    from .report import write_report

    path = _guard(lambda: write_report(run_dirs, out or run_dirs[0]))
    console.print(path.read_text(), markup=False, highlight=False)
    console.print(f"written: {path} (+ PNGs beside it)")


# --------------------------------------------------------------------------------------- Flower engine
@app.command("flower-app")
def flower_app(
    config: Path,
    overrides: list[str] | None = _OVERRIDES,
    out: Path = typer.Option(Path("flower-app"), help="folder to write the Flower app (pyproject.toml) into"),
    resume: bool = typer.Option(
        False, "--resume", help="the ServerApp continues the run from its checkpoint"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="the ServerApp replaces an earlier run"),
    superlink: str = typer.Option("SERVER:9093", help="SuperLink address the printed commands use"),
) -> None:
    """Write a Flower app that runs this config on a SuperLink, and print the commands for every machine."""
    from .flower.deploy import write_app
    from .flower.server_app import check_flower_config

    cfg = _load(config, overrides)
    _guard(lambda: check_flower_config(cfg))
    # The ServerApp runs in a process the SuperLink starts, from another folder: relative paths would move.
    cfg.output_dir = str(Path(cfg.output_dir).resolve())
    if cfg.data.root and not Path(cfg.data.root).is_absolute():
        cfg.data.root = str(Path(cfg.data.root).resolve())
    folder = write_app(out, cfg, resume=resume, overwrite=overwrite)
    n = "N"
    typer.echo(
        f"wrote {folder}/pyproject.toml (run {cfg.name}: {cfg.federated.algorithm}, {cfg.federated.rounds} rounds)\n"
        "server machine:\n"
        "  flower-superlink --host 0.0.0.0 --port 9093 --disable-runtime-dependency-installation \\\n"
        "    --ssl-ca-certfile certs/ca.crt --ssl-certfile certs/server.pem --ssl-keyfile certs/server.key "
        "--enable-supernode-auth\n"
        "  flwr supernode register certs/node-I.pub fedbiscuit      # once per client machine\n"
        f"client machine I (of {n}):\n"
        f"  flower-supernode --superlink {superlink} --root-certificates ca.crt "
        "--auth-supernode-private-key node-I.key \\\n"
        f"    --node-config 'partition-id=I num-partitions={n} data-root=\"/path/to/its/data\"'\n"
        f"start the run (FLWR_HOME/config.toml names the connection 'fedbiscuit'):\n"
        f"  flwr run {folder} fedbiscuit --stream\n"
        f"the run folder will be {cfg.run_dir} on the server (README: Federated deployment (Flower))"
    )


@app.command("flower-certs")
def flower_certs(
    folder: Path,
    host: list[str] = typer.Option(
        ["127.0.0.1", "localhost"], help="SuperLink host names / IPs the certificate is valid for"
    ),
    nodes: int = typer.Option(0, help="also make this many SuperNode key pairs (node-I.key / node-I.pub)"),
) -> None:
    """A CA, the SuperLink's TLS certificate and SuperNode authentication keys (EC P-384)."""
    from .flower.deploy import make_certificates, make_node_key

    paths = make_certificates(folder, host)
    keys = [make_node_key(folder, f"node-{i}") for i in range(nodes)]
    typer.echo(
        f"CA: {paths['ca']} (give it to every client machine; keep {paths['ca_key']} offline)\n"
        f"SuperLink: {paths['cert']} + {paths['key']} for {', '.join(host)}"
        + "".join(
            f"\nnode-{i}: {k} (to that machine), {p} (register on the server)"
            for i, (k, p) in enumerate(keys)
        )
    )


@app.command("flower-inprocess")
def flower_inprocess(
    config: Path,
    overrides: list[str] | None = _OVERRIDES,
    resume: bool = typer.Option(False, "--resume", help="continue the run from its newest checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier run of the same name"),
) -> None:
    """Run the Flower ServerApp with one ClientApp node per client, all in this process (no SuperLink)."""
    from .data import prepare_data
    from .flower.inprocess import run_inprocess

    cfg = _load(config, overrides)
    n = len(_guard(lambda: prepare_data(cfg.data, seed=cfg.seed)).clients)
    nodes = [{"partition-id": i, "num-partitions": n} for i in range(n)]
    results = _guard(lambda: run_inprocess(cfg, nodes, resume=resume, overwrite=overwrite))
    if results["final"]:
        _federated_summary(results)
    else:
        console.print(json.dumps({k: results[k] for k in ("run_dir", "rounds", "clusters", "faults")}))


@app.command("flower-sim")
def flower_sim(
    config: Path,
    overrides: list[str] | None = _OVERRIDES,
    supernodes: int | None = typer.Option(
        None, "--supernodes", help="virtual SuperNodes; default: one per client of the config's data"
    ),
    resume: bool = typer.Option(False, "--resume", help="continue the run from its newest checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier run of the same name"),
) -> None:
    """Run the Flower ServerApp and ClientApp under Flower's simulation runtime (Ray), one virtual SuperNode
    per client; resources per actor: federated.flower.simulation (needs the [simulation] extra)."""
    from .flower.simulation import SimulationError, run_simulation, simulation_device_note

    cfg = _load(config, overrides)
    sim = cfg.federated.flower.simulation
    console.print(
        f"Flower simulation of {cfg.name}: {sim.cpus_per_client} CPU and {sim.gpus_per_client:g} GPU per "
        f"ClientApp actor; Flower's and Ray's log go to {cfg.run_dir / 'flower-sim'}"
    )
    if note := simulation_device_note(cfg):
        console.print(f"[yellow]note:[/yellow] {note}")
    try:
        results = _guard(lambda: run_simulation(cfg, supernodes, resume=resume, overwrite=overwrite))
    except SimulationError as err:
        from rich.markup import escape

        _fail(escape(str(err)))  # Flower's log lines hold brackets rich would read as markup
    if results["final"]:
        _federated_summary(results)
    else:
        console.print(json.dumps({k: results[k] for k in ("run_dir", "rounds", "clusters", "faults")}))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
