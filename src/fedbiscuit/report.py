"""`fedbiscuit report RUN_DIR ...`: plots and a Markdown table from runs' metrics.jsonl, several runs side by side."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from .runs import read_records  # noqa: E402
from .selector.metrics import client_fairness  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)  # figures are files here; an open one would hold its memory for the whole report


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a fedbiscuit run folder?")
    return read_records(path)


def headline_report(eval_record: dict) -> tuple[str, dict] | None:
    """The report that answers "how well does this run's selector serve a client": the client's own
    (cluster's) selector where there is one, else the vote, else the single selector; at round 0 (before
    training) the untrained selector."""
    if "own" in eval_record:
        return "own", eval_record["own"]
    selectors = eval_record.get("selectors") or {}
    if eval_record.get("round") == 0 and selectors:
        # before any round every selector is the base model (LoRA starts as a no-op): the untrained selector
        # is any one of them, not their vote, whose hard votes turn a position-biased selector's pairs to ties
        return next(iter(selectors.items()))
    if "vote" in eval_record:
        return "vote", eval_record["vote"]
    if len(selectors) == 1:
        return next(iter(selectors.items()))
    if "overall" in eval_record:  # centralized pipeline
        return "selector", eval_record
    return None


def headline(eval_record: dict) -> tuple[str, dict] | None:
    """(what measured it, the overall figures) of headline_report."""
    h = headline_report(eval_record)
    return (h[0], h[1]["overall"]) if h else None


def populations(
    final: dict | None, unseen: dict | None, personalized: dict | None
) -> list[tuple[str, str, dict]]:
    """(population, measured by, agreement report) for every population a run evaluated: the seen clients by
    the headline selector on the evaluation split, the unseen clients by the selector each joined (and by the
    vote of several), and each population's personalised copies."""
    rows = []
    h = headline_report(final) if final else None
    if h:
        rows.append(("seen", h[0], h[1]))
    if unseen and "own" in unseen:  # absent when no unseen client could score the selectors
        rows.append(("unseen", "joined", unseen["own"]))
        if "vote" in unseen:
            rows.append(("unseen", "vote", unseen["vote"]))
    for pop in ("seen", "unseen"):
        part = (personalized or {}).get(pop) or {}
        if "personalized" in part:
            rows.append((f"{pop} personalised", f"{personalized['steps']} steps", part["personalized"]))
    return rows


def _natural(client: str) -> str:
    return client.split("#", 1)[0]


def purity(assignment: dict[str, str], group_of=_natural) -> float:
    """Share of clients whose cluster's majority natural group is their own (1.0: clusters never mix groups)."""
    clusters: dict[str, Counter] = {}
    for client, sel in assignment.items():
        clusters.setdefault(sel, Counter())[group_of(client)] += 1
    return sum(c.most_common(1)[0][1] for c in clusters.values()) / max(1, len(assignment))


def adjusted_rand(assignment: dict[str, str], group_of=_natural) -> float:
    """Adjusted Rand index of the clusters against the clients' groups: 1 when they coincide, about 0 for a
    grouping no better than chance. Unlike purity it is fair to groups of unequal size (4 harmlessness clients
    among 16: every balanced grouping into 2 clusters of 8 has purity 75% against them, whatever it found).
    Hubert and Arabie (1985); written here because sklearn is not a dependency for one formula."""
    from math import comb

    table = Counter((sel, group_of(c)) for c, sel in assignment.items())
    rows, cols = Counter(assignment.values()), Counter(group_of(c) for c in assignment)
    index = sum(comb(n, 2) for n in table.values())
    a, b = sum(comb(n, 2) for n in rows.values()), sum(comb(n, 2) for n in cols.values())
    expected = a * b / max(1, comb(len(assignment), 2))
    top = (a + b) / 2
    return 0.0 if top == expected else (index - expected) / (top - expected)


def chance_probability(
    assignment: dict[str, str], group_of=_natural, statistic=purity, draws: int = 20_000, seed: int = 0
) -> float:
    """How often clusters of the same sizes, filled with the same clients at random, score at least as high on
    ``statistic`` (purity, adjusted_rand) as ``assignment``: a permutation test, 1 / (draws + 1) at the least.

    Purity alone misleads: with 16 clients in 4 groups and 2 clusters of 8 it is 25-50% whatever the grouping
    found, and random balanced clusters reach 37.5% in most draws. The permutation keeps the cluster sizes
    (balanced clusters stay balanced) and shuffles which client sits where."""
    import random

    clients = list(assignment)
    observed = statistic(assignment, group_of)
    slots = [assignment[c] for c in clients]
    rng = random.Random(seed)
    at_least = 0
    for _ in range(draws):
        rng.shuffle(slots)
        # a small tolerance: equal statistics of different fillings must compare equal despite rounding
        at_least += statistic(dict(zip(clients, slots, strict=True)), group_of) >= observed - 1e-9
    return (at_least + 1) / (draws + 1)


def summarize(run_dir: Path) -> dict:
    records = read_metrics(run_dir)
    evals = [r for r in records if r["event"] == "eval"]
    curve = []
    for r in evals:
        h = headline(r)
        if h:
            x = r.get("round", 0 if r.get("stage") == "before" else None)
            curve.append((x, h[1]["agreement"], h[0], h[1]))
    # federated runs' agreement on the clients' held-out slices of the training split (eval.heldout_every: what
    # settings are tuned on), by round; a centralized run's held-out points count optimizer steps, not rounds
    heldout = []
    for r in records:
        h = headline(r) if r["event"] == "heldout" and "round" in r else None
        if h:
            heldout.append(
                (r["round"], h[1]["agreement"], *_nan(h[1].get("ci95") or (None, None)), h[1]["n"])
            )
    groupings = [r for r in records if r["event"] == "grouping"]
    rounds = [r for r in records if r["event"] == "round"]
    last = curve[-1] if curve else None
    newest = {
        kind: next((r for r in reversed(records) if r["event"] == kind), None)
        for kind in ("unseen", "personalized")
    }
    final_eval = next((r for r in reversed(evals) if headline(r)), None)
    data = next((r for r in records if r["event"] == "data"), {})
    # a centralized run's trained figure has no round: the agreement plot draws it as a reference line
    central = (
        final_eval
        if final_eval and "round" not in final_eval and final_eval.get("stage") == "after"
        else None
    )
    return {
        "name": Path(run_dir).name,
        "curve": [(x, y) for x, y, _, _ in curve if x is not None],
        "band": [(x, *_nan(o.get("ci95") or (None, None))) for x, _, _, o in curve if x is not None],
        "final": last,
        "first": curve[0] if curve else None,
        "heldout": heldout,
        "groupings": groupings,
        "rounds": len(rounds),
        "round_seconds": sum(r["seconds"] for r in rounds),
        "client_seconds": sum(r["client_seconds"] for r in rounds),
        "rejected": sum(len(r["rejected"]) for r in rounds),
        "dpo": [r for r in records if r["event"] == "dpo"],
        "winrate": [r for r in records if r["event"] == "winrate"],
        "best_of_n": next((r for r in records if r["event"] == "best_of_n"), None),
        "dpo_curve": [r for r in records if r["event"] == "curve"],
        "populations": populations(final_eval, newest["unseen"], newest["personalized"]),
        "length_rule": data.get("length_rule"),
        "central": headline(central)[1] if central else None,
    }


def fairness(report: dict) -> dict:
    """The report's per-client figures (computed here for runs logged before reports carried them)."""
    return report.get("fairness") or client_fairness(report["clients"])


POPULATION_COLOURS = {"seen": "C0", "unseen": "C1", "seen personalised": "C2", "unseen personalised": "C3"}


def _per_client(runs: list[dict], out_dir: Path) -> list[str]:
    """A strip plot (one point per client, every population of every run side by side, the mean over clients
    marked) and the Markdown table of the same figures."""
    # the vote is a second view of the unseen clients, not another population: the table has it, the plot not
    plotted = [[row for row in run["populations"] if row[1] != "vote"] for run in runs]
    if not any(plotted):
        return []
    fig, ax = plt.subplots(figsize=(3 + 0.6 * sum(len(rows) for rows in plotted), 4.5))
    labelled: set[str] = set()
    for i, rows in enumerate(plotted):
        width = 0.8 / max(1, len(rows))  # run i's slot on the x axis, shared by its populations
        if i:
            ax.axvline(i - 0.5, color="lightgrey", lw=0.8)
        for j, (population, _, rep) in enumerate(rows):
            f = fairness(rep)
            ys = sorted(100 * c["agreement"] for c in rep["clients"].values() if c["n"] >= f["min_pairs"])
            x = i - 0.4 + width * (j + 0.5)
            # clients spread evenly across the slot (sorted, so equal values do not hide one another)
            xs = [x + width * 0.3 * (2 * k / (len(ys) - 1) - 1) if len(ys) > 1 else x for k in range(len(ys))]
            label = None if population in labelled else population
            labelled.add(population)
            ax.scatter(xs, ys, s=16, alpha=0.7, color=POPULATION_COLOURS[population], label=label)
            if ys:
                ax.hlines(100 * f["mean"], x - width * 0.4, x + width * 0.4, color="black", lw=2)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(runs)), [r["name"] for r in runs], fontsize=8)
    ax.set(
        ylabel="agreement with the client's labels (%)", title="per-client agreement (bar: mean over clients)"
    )
    ax.set_ylim(-5, 105)
    ax.legend(fontsize=7)
    _save(fig, out_dir / "per_client.png")

    lines = [
        "",
        "## Per client: seen and unseen clients",
        "",
        "| run | clients | measured by | n | pairs | agreement | 95% CI | mean over clients | worst client | p10 | spread |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for population, measured_by, rep in run["populations"]:
            o, f = rep["overall"], fairness(rep)
            small = f" (+{f['left_out']} small)" if f["left_out"] else ""
            worst = f"{_pct(f['worst'])} ({f['worst_client']})" if f["worst_client"] else "-"
            lines.append(
                f"| {run['name']} | {population} | {measured_by} | {f['clients']}{small} | {o['n']} | "
                f"{_pct(o['agreement'])} | {_pct(o['ci95'][0])} to {_pct(o['ci95'][1])} | {_pct(f['mean'])} | "
                f"{worst} | {_pct(f['p10'])} | {_pct(f['spread'])} |"
            )
    lines += [
        "",
        "Each client counted once: 'mean over clients', the worst client, the 10th percentile (p10) and the spread "
        "(best minus worst client) are over clients with at least the run's eval.min_client_pairs evaluated pairs "
        "('small' ones are left out). 'seen': the clients that trained, on the evaluation split; 'unseen': clients "
        "held out of training, each judged by the selector it joined on its labelled slice (or by the vote), on "
        "its other pairs; 'personalised': each client's own fine-tuned copy of the selector it used.",
        "",
        "![per client](per_client.png)",
    ]
    return lines


def _curves(series: list[tuple], path: Path, **labels: str) -> None:
    """Per run (name, x, points, tags): the judge's win rate (solid, its 95% band) and the selectors' (dashed),
    each point tagged (n, or the DPO step); 50% dashed grey."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, x, points, tags in series:
        judge = [100 * p["judge"] for p in points]
        line = ax.plot(x, judge, marker="o", label=f"{name}: judge")[0]
        ax.fill_between(
            x,
            [100 * p["judge_ci95"][0] for p in points],
            [100 * p["judge_ci95"][1] for p in points],
            color=line.get_color(),
            alpha=0.2,
        )
        ax.plot(
            x,
            [100 * p["selectors"] for p in points],
            ls="--",
            marker="x",
            color=line.get_color(),
            label=f"{name}: selectors",
        )
        for xi, yi, tag in zip(x, judge, tags, strict=True):
            ax.annotate(tag, (xi, yi), fontsize=7)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set(**labels)
    ax.legend(fontsize=7)
    _save(fig, path)


def _best_of_n_plot(runs: list[dict], path: Path) -> None:
    """The best-of-n curve against KL_bon = log n - (n - 1)/n: the judge's win rate of the selectors' pick
    (solid, 95% band) and the selectors' own (dashed). The selectors' curve rising while the judge's falls is
    over-optimization (Gao et al. 2022)."""
    series = []
    for run in runs:
        c = run["best_of_n"]["curve"]
        series.append((run["name"], [r["kl_bon"] for r in c], c, [f"n={r['n']}" for r in c]))
    _curves(
        series,
        path,
        xlabel="KL_bon = log n - (n-1)/n (nats)",
        ylabel="pick's win rate vs reference (%)",
        title="best-of-n: the judge (band: 95% CI) and the selectors",
    )


def _curve_plot(runs: list[dict], path: Path) -> None:
    """The over-optimization curve along DPO: the tuned policy's win rate against the reference by the judge
    (solid, 95% band) and by the labelling selectors (dashed), against how far the policy moved (its answers'
    log-ratio to the reference policy), each point marked with its DPO step. The selectors' curve rising while
    the judge's turns down is reward hacking (Gao et al. 2022)."""
    series = []
    for run in runs:
        c = run["dpo_curve"]
        points = [
            {
                "judge": r["gold"]["win_rate"],
                "judge_ci95": r["gold"]["ci95"],
                "selectors": r["proxy"]["win_rate"],
            }
            for r in c
        ]
        series.append((run["name"], [r["log_ratio"] for r in c], points, [f"step {r['step']}" for r in c]))
    _curves(
        series,
        path,
        xlabel="policy's answers: log pi / pi_ref (nats)",
        ylabel="win rate vs reference (%)",
        title="along DPO: the judge (band: 95% CI) and the selectors",
    )


def _phase2(runs: list[dict], out_dir: Path) -> list[str]:
    """DPO loss and reward margin against step; win rate (with its 95% interval) and answer length against
    checkpoint. Returns the report's Markdown lines for phase 2 (none if no run has one)."""
    tuned = [r for r in runs if r["winrate"]]
    if not tuned:
        return []
    fig, (loss_ax, margin_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for run in tuned:
        if run["dpo"]:
            steps = [d["step"] for d in run["dpo"]]
            loss_ax.plot(steps, [d["loss"] for d in run["dpo"]], label=run["name"])
            margin_ax.plot(steps, [d["reward_margin"] for d in run["dpo"]], label=run["name"])
    loss_ax.set(xlabel="DPO step", ylabel="loss", title="DPO loss")
    margin_ax.axhline(0, color="grey", lw=0.8, ls="--")
    margin_ax.set(xlabel="DPO step", ylabel="chosen - rejected reward", title="reward margin")
    if loss_ax.get_legend_handles_labels()[0]:
        loss_ax.legend()
    _save(fig, out_dir / "dpo.png")

    fig, (win_ax, len_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for run in tuned:
        w = run["winrate"]
        xs = [r["label"] for r in w]
        ys = [100 * r["win_rate"] for r in w]
        err = [
            [100 * (r["win_rate"] - r["ci95"][0]) for r in w],
            [100 * (r["ci95"][1] - r["win_rate"]) for r in w],
        ]
        win_ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label=run["name"])
        len_ax.plot(xs, [r["mean_new_tokens"] for r in w], marker="o", label=run["name"])
    win_ax.axhline(50, color="grey", lw=0.8, ls="--")
    win_ax.set(ylabel="win rate vs reference (%)", title="win rate by checkpoint (95% CI)")
    len_ax.set(ylabel="mean answer tokens", title="answer length by checkpoint")
    win_ax.legend()
    _save(fig, out_dir / "winrate.png")
    curves = [r for r in tuned if r["best_of_n"] and r["best_of_n"].get("curve")]
    if curves:
        _best_of_n_plot(curves, out_dir / "best_of_n.png")
    along = [r for r in tuned if r["dpo_curve"]]
    if along:
        _curve_plot(along, out_dir / "overoptimization.png")

    lines = [
        "",
        "## Phase 2",
        "",
        "| run | checkpoint | judge | win rate | 95% CI | wins / ties / losses | answer tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in tuned:
        for r in run["winrate"]:
            lines.append(
                f"| {run['name']} | {r['label']} | {r['judge']} | {_pct(r['win_rate'])} | "
                f"{_pct(r['ci95'][0])} to {_pct(r['ci95'][1])} | {r['wins']} / {r['ties']} / {r['losses']} | "
                f"{r['mean_new_tokens']:.1f} |"
            )
    for run in tuned:
        b = run["best_of_n"]
        if b:
            lines.append(
                f"\n{run['name']}: best-of-{b['n']} on {b['prompts']} prompts: the selectors' pick wins "
                f"{_pct(b['pick_vs_reference']['win_rate'])}, the first sample {_pct(b['first_vs_reference']['win_rate'])}; "
                f"answer tokens {b['pick_mean_new_tokens']:.1f} vs {b['first_mean_new_tokens']:.1f}."
            )
    if curves:
        lines.append("\n![best of n](best_of_n.png)")
    for run in along:
        lines += [
            "",
            f"{run['name']}, along DPO (rlhf.curve_every): the judge's and the labelling selectors' win rates",
            "",
            "| DPO step | log pi / pi_ref (nats) | judge | 95% CI | length-controlled | selectors | answer tokens |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in run["dpo_curve"]:
            g, lc = r["gold"], r["gold"].get("length_controlled")
            lines.append(
                f"| {r['step']} | {r['log_ratio']:.2f} | {_pct(g['win_rate'])} | {_pct(g['ci95'][0])} to "
                f"{_pct(g['ci95'][1])} | {_pct(lc['win_rate']) if lc else '-'} | {_pct(r['proxy']['win_rate'])} | "
                f"{r['mean_new_tokens']:.1f} |"
            )
        lines.append("\n![over-optimization](overoptimization.png)")
    lines += [
        "",
        "A prompt is a win when the judge prefers the policy's answer in both presentation orders, a loss when it "
        "prefers the reference in both, a tie otherwise; win rate = (wins + ties/2) / prompts. 'initial policy' "
        "is the untuned model against the reference: its distance from 50% is the noise at this many prompts. "
        "Longer answers without a higher win rate, or best-of-n picks that lose to the first sample, are signs "
        "of reward hacking.",
        "",
        "![dpo](dpo.png)",
        "![winrate](winrate.png)",
    ]
    return lines


def _pct(x) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}%"


def _nan(values) -> list[float]:
    """Logged figures with NaN written as null (JSON has no NaN) back to floats for plotting."""
    return [float("nan") if v is None else v for v in values]


def _percent(values) -> list[float]:
    """Agreements as percentages; a null one (no decided pair) as a gap."""
    return [100 * v if v is not None else float("nan") for v in values]


def _agreement_plot(runs: list[dict], path: Path) -> None:
    """Agreement over rounds from the untrained start, each point's 95% interval as a band; the untrained
    figure, chance, the length rule and a centralized run's trained selector (with its band) as reference lines;
    whole-number round ticks."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        colour = None  # the held-out slices take the colour of the run's test-split line
        if run["curve"]:
            xs, ys = zip(*run["curve"], strict=True)
            (line,) = ax.plot(xs, _percent(ys), marker="o", label=run["name"])
            colour = line.get_color()
            _, lo, hi = zip(*run["band"], strict=True)
            ax.fill_between(xs, _percent(lo), _percent(hi), color=colour, alpha=0.15)
            if xs[0] == 0 and len(xs) > 1:  # the untrained selector, as a line to read the gain against
                ax.axhline(100 * ys[0], color=colour, lw=0.8, ls=":")
                ax.annotate(
                    f"untrained {100 * ys[0]:.1f}%",
                    (xs[-1], 100 * ys[0]),
                    fontsize=7,
                    ha="right",
                    va="bottom",
                )
        # a centralized run's trained selector: a line and band in the colour of its untrained point
        if run["central"]:
            value, (lo, hi) = (
                100 * run["central"]["agreement"],
                _nan(run["central"].get("ci95") or (None, None)),
            )
            line = ax.axhline(value, color=colour, lw=1.0, label=f"{run['name']} (centralized, trained)")
            ax.axhspan(100 * lo, 100 * hi, color=line.get_color(), alpha=0.08)
        if run["heldout"]:
            xs, ys, lo, hi, _ = zip(*run["heldout"], strict=True)
            (line,) = ax.plot(
                xs, _percent(ys), ls="--", marker="s", ms=4, color=colour, label=f"{run['name']} (held-out)"
            )
            ax.fill_between(xs, _percent(lo), _percent(hi), color=line.get_color(), alpha=0.08)
    left = ax.get_xlim()[0]
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.annotate("chance", (left, 50), fontsize=7, va="bottom")
    # the length rule, once per distinct evaluation split
    for value in sorted({round(100 * r["length_rule"]["agreement"], 1) for r in runs if r["length_rule"]}):
        ax.axhline(value, color="black", lw=0.8, ls="-.")
        ax.annotate(f"longer answer wins {value:.1f}%", (left, value), fontsize=7, va="bottom")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(
        xlabel="round (0: untrained)",
        ylabel="agreement with human labels (%)",
        title="selector agreement (band: 95% interval)"
        + (
            "\nsolid: evaluation split; dashed: held-out slices of the training split"
            if any(run["heldout"] for run in runs)
            else ""
        ),
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    _save(fig, path)


def grouping_decided(grouping: dict) -> tuple[int | None, float | None]:
    """A logged grouping's (clients decided, median z): relative to the other clients where the run logged them
    (what trust is judged on), else the raw ones of runs logged before."""
    prefix = "relative_" if "relative_decided" in grouping else ""
    return grouping.get(f"{prefix}decided"), grouping.get(f"{prefix}median_z")


def _clusters_plot(clustered: list[dict], path: Path) -> None:
    """Each client's cluster at each grouping, a legend naming the selector of each colour, and under each
    grouping round how many clients the scores decided (margin beyond 2 standard errors, relative to the other
    clients where the run logged it) and the median z."""
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, len(clustered), figsize=(4 + 3 * len(clustered), 5), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, run in zip(axes[0], clustered, strict=True):
        clients = sorted(run["groupings"][0]["assignment"])
        selectors = sorted({s for g in run["groupings"] for s in g["assignment"].values()})
        grid = [[selectors.index(g["assignment"][c]) for g in run["groupings"]] for c in clients]
        ax.imshow(grid, aspect="auto", cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
        ax.set_yticks(range(len(clients)), clients, fontsize=7)
        ticks = []
        # grouped by update directions: no trust judged, a median cosine margin
        by_direction = [g.get("trusted", False) is None and "median_margin" in g for g in run["groupings"]]
        for g, direction in zip(run["groupings"], by_direction, strict=True):
            if direction:
                ticks.append(f"{g['round']}\ncos margin\n{g['median_margin']:.2f}")
            elif "decided" in g:
                decided, median_z = grouping_decided(g)
                z = "-" if median_z is None else f"{median_z:.1f}"  # no client could score: null
                ticks.append(f"{g['round']}\n{decided}/{len(g['losses'])}\nz {z}")
            else:  # a run logged before margins were recorded
                ticks.append(str(g["round"]))
        ax.set_xticks(range(len(run["groupings"])), ticks, fontsize=7)
        relative = any("relative_decided" in g for g in run["groupings"])
        label = ["grouping round"]
        if not all(by_direction):  # some grouping scored held-out losses
            label.append("clients decided" + (" relative to the others" if relative else "") + " / median z")
        if any(by_direction):
            label.append("median cosine margin (grouped by update directions)")
        ax.set(
            xlabel=" / ".join(label),
            title=f"{run['name']}: cluster of each client",
        )
        ax.legend(
            handles=[Patch(color=cmap(i), label=s) for i, s in enumerate(selectors)],
            fontsize=7,
            loc="upper left",
            bbox_to_anchor=(1.0, 1.0),
        )
    _save(fig, path)


def _length_lines(runs: list[dict]) -> list[str]:
    """One sentence per distinct evaluation split: how far "the longer answer is better" goes on it."""
    splits: dict[tuple, list[str]] = {}
    for run in runs:
        if r := run["length_rule"]:
            splits.setdefault((r["agreement"], r["n"], *r["ci95"]), []).append(run["name"])
    return [
        f"On the evaluation pairs of {', '.join(names)} the rule 'the longer answer is better' agrees "
        f"{_pct(a)} [{_pct(lo)}, {_pct(hi)}] (n {n}): a selector near that figure may have learned length alone."
        for (a, n, lo, hi), names in splits.items()
    ]


def write_report(run_dirs: list[Path], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [summarize(Path(d)) for d in run_dirs]

    _agreement_plot(runs, out_dir / "agreement.png")
    clustered = [r for r in runs if r["groupings"]]
    if clustered:
        _clusters_plot(clustered, out_dir / "clusters.png")

    lines = [
        "# Run summary",
        "",
        "| run | rounds | start | final | A\\|B | B\\|A | Brier | measured by | held-out | purity | left out |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        f, first = run["final"], run["first"]
        if f is None:
            lines.append(
                f"| {run['name']} | {run['rounds']} | - | - | - | - | - | no evaluation yet | - | - | - |"
            )
            continue
        o = f[3]
        last = run["groupings"][-1]["assignment"] if run["groupings"] else None
        pur = f"{_pct(purity(last))} (p {chance_probability(last, draws=2_000):.2g})" if last else "-"
        held = run["heldout"][-1] if run["heldout"] else None
        held_cell = f"{_pct(held[1])} (round {held[0]}, n {held[4]})" if held else "-"
        lines.append(
            f"| {run['name']} | {run['rounds']} | {'-' if first is f else _pct(first[1])} | {_pct(o['agreement'])} | "
            f"{_pct(o.get('agreement_ab'))} "
            f"| {_pct(o.get('agreement_ba'))} | {o['brier']:.3f} | {f[2]} | {held_cell} | {pur} | {run['rejected']} |"
        )
    lines += [
        "",
        "Agreement averages both presentation orders (A|B and B|A are each order alone); 50% is chance.",
        *_length_lines(runs),
        "'measured by': the client's own cluster selector (FedBiscuit, local), the vote, or the single selector.",
        "Held-out: the same figure on the clients' held-out slices of the training split (eval.heldout_every), the",
        "pairs settings are chosen on; the evaluation split only reports.",
        "Purity: share of clients whose cluster's majority natural client id (the name before '#') is their own;",
        "p: how often clusters of the same sizes filled at random are at least as pure (2,000 draws).",
        "",
        "![agreement](agreement.png)",
    ]
    if clustered:
        lines.append("![clusters](clusters.png)")
    lines += _per_client(runs, out_dir)
    lines += _phase2(runs, out_dir)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
