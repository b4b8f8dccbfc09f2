"""Win rate against a reference, judged in both orders, and the best-of-n probe for reward hacking.

A prompt is a win when the judge prefers the policy's answer in both orders, a loss when it prefers the
reference in both, and a tie otherwise (the judge changed its mind with the order, or the texts are equal).
Win rate = (wins + ties / 2) / prompts, with a normal-approximation 95% interval over prompts. Also reported:
the win rate when each prompt's two verdicts are averaged first (softer, for judges with a position bias), and,
given the answers' lengths, the length-controlled win rate (the verdict regressed on the length difference, read
at zero difference): a gain that is only longer answers shows there as none.
"""

from __future__ import annotations

import math

from ..data.pairs import prompt_hash
from .judges import Judge


def win_rate(
    judge: Judge,
    prompts: list[str],
    answers: list[str],
    reference: list[str],
    lengths: tuple[list[int], list[int]] | None = None,
) -> dict:
    """``lengths``: (the answers' lengths, the reference's), in tokens: adds the length-controlled win rate."""
    from scipy.stats import binomtest

    if not prompts:
        raise ValueError("no prompts to judge")
    abstained = getattr(judge, "unparsed", 0)  # the judge counts over its lifetime; report this call's
    shown_first = judge.prefer(prompts, answers, reference)  # P(policy better), policy shown first
    shown_second = judge.prefer(prompts, reference, answers)  # P(reference better), policy shown second
    scores, wins, losses, ties, identical = [], 0, 0, 0, 0
    for a, r, p1, p2 in zip(answers, reference, shown_first, shown_second, strict=True):
        if a == r:
            identical += 1
            ties += 1
            scores.append(0.5)
        elif p1 > 0.5 and p2 < 0.5:
            wins += 1
            scores.append(1.0)
        elif p1 < 0.5 and p2 > 0.5:
            losses += 1
            scores.append(0.0)
        else:
            ties += 1
            scores.append(0.5)
    n = len(scores)
    mean = sum(scores) / n
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n)
    averaged = [(p1 + 1.0 - p2) / 2 for p1, p2 in zip(shown_first, shown_second, strict=True)]
    prob = sum(averaged) / n
    # The softer reading: the judge's two orders averaged, a win when that average favours the policy. A judge
    # with a strong position bias gives ties under the strict rule; this still reads its residual preference.
    soft = [
        0.5 if a == r or abs(p - 0.5) < 1e-6 else float(p > 0.5)
        for a, r, p in zip(answers, reference, averaged, strict=True)
    ]
    return {
        "judge": judge.name,
        "prompts": n,
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "identical": identical,
        "win_rate": mean,
        "ci95": [max(0.0, mean - half), min(1.0, mean + half)],
        "mean_prob": prob,  # the judge's mean P(policy better), both orders averaged
        "averaged_win_rate": sum(soft) / n,
        # the sign test of wins against losses (ties carry no sign): is the policy better than the reference?
        "sign_p": binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0,
        "scores": scores,  # per prompt (1 win, 0 loss, 0.5 tie), in order: for paired tests between policies
        "prompt_ids": [
            f"{prompt_hash(p):016x}" for p in prompts
        ],  # which prompt each score is (pairing by content)
        # judge replies with no verdict, over both orders (each scored 0.5: a tie unless the other order decides)
        "unparsed": getattr(judge, "unparsed", 0) - abstained,
        **(
            {"length_controlled": length_controlled(scores, [a - r for a, r in zip(*lengths, strict=True)])}
            if lengths is not None and n > 1
            else {}
        ),
    }


def _knockout_levels(judge: Judge, prompts: list[str], candidates: list[list[str]]):
    """Each level of a knockout over every prompt's candidates: the indices still alive, per prompt. Candidates
    meet in pairs, winners advance (a bye for an odd one out); one judge call per level, batched across prompts;
    undecided meetings go to the earlier candidate."""
    alive = [list(range(len(c))) for c in candidates]
    while any(len(a) > 1 for a in alive):
        meetings = []  # (prompt index, i, j)
        for k, a in enumerate(alive):
            meetings += [(k, a[m], a[m + 1]) for m in range(0, len(a) - 1, 2)]
        probs = judge.prefer(
            [prompts[k] for k, _, _ in meetings],
            [candidates[k][i] for k, i, _ in meetings],
            [candidates[k][j] for k, _, j in meetings],
        )
        winners: dict[int, list[int]] = {k: [] for k in range(len(alive))}
        for (k, i, j), p in zip(meetings, probs, strict=True):
            winners[k].append(i if p >= 0.5 else j)
        alive = [
            winners[k] + ([a[-1]] if len(a) % 2 else []) if len(a) > 1 else a for k, a in enumerate(alive)
        ]
        yield alive


def knockout(judge: Judge, prompts: list[str], candidates: list[list[str]]) -> list[int]:
    """Index of each prompt's knockout winner (``_knockout_levels``'s last level)."""
    last = [list(range(len(c))) for c in candidates]  # one candidate each: no meeting, no level
    for last in _knockout_levels(judge, prompts, candidates):  # noqa: B007 (the last level is the result)
        pass
    return [a[0] for a in last]


def bracket_winners(judge: Judge, prompts: list[str], candidates: list[list[str]]) -> list[list[int]]:
    """A knockout over each prompt's n candidates (n a power of 2), and every level's winner of the first
    block: ``[level][prompt]``, where level k's winner is the pick among the first 2**k candidates (level 0 is
    candidate 0 itself). One bracket thus gives best-of-1, 2, 4, ... n from the same samples, each pick a
    knockout within the one before it, as a best-of-n curve needs (Gao et al. 2022, "Scaling laws for reward
    model overoptimization")."""
    n = len(candidates[0]) if candidates else 0
    if n < 1 or n & (n - 1) or any(len(c) != n for c in candidates):
        raise ValueError(
            f"best-of-n brackets need the same power-of-2 number of candidates per prompt, got {n}"
        )
    # with 2**k candidates there are no byes: after level k, position 0 holds the winner of the first 2**k
    return [[0] * len(candidates)] + [
        [a[0] for a in alive] for alive in _knockout_levels(judge, prompts, candidates)
    ]


def kl_best_of_n(n: int) -> float:
    """KL divergence of the best-of-n policy from the sampling policy: log n - (n - 1) / n (Stiennon et al.
    2020; Gao et al. 2022 use it as the x axis of over-optimization curves)."""
    return math.log(n) - (n - 1) / n


def best_of_n_curve(
    picker: Judge,
    judge: Judge,
    prompts: list[str],
    candidates: list[list[str]],
    baseline: list[str],
    lengths: list[list[int]] | None = None,
    baseline_lengths: list[int] | None = None,
) -> list[dict]:
    """For n = 1, 2, 4, ... len(candidates[i]): the picker's best-of-n against ``baseline`` (an independent
    sample of the same prompt), judged both by ``judge`` (the gold judge: it saw none of the picker's data) and
    by the picker itself (the proxy). Gold rising with n: the picker carries signal the judge agrees with;
    proxy rising while gold falls: over-optimization. At n = 1 both read two independent samples: about 50%."""
    rows = []
    for level, picks in enumerate(bracket_winners(picker, prompts, candidates)):
        n = 2**level
        chosen = [c[i] for c, i in zip(candidates, picks, strict=True)]
        both = None
        if lengths is not None and baseline_lengths is not None:
            both = ([x[i] for x, i in zip(lengths, picks, strict=True)], baseline_lengths)
        row = {
            "n": n,
            "kl_bon": kl_best_of_n(n),
            "gold": win_rate(judge, prompts, chosen, baseline, both),
            "proxy": win_rate(picker, prompts, chosen, baseline, both),
            "picks": picks,
        }
        if lengths is not None:
            row["mean_new_tokens"] = sum(x[i] for x, i in zip(lengths, picks, strict=True)) / len(picks)
        rows.append(row)
    return rows


def length_controlled(
    scores: list[float], length_diff: list[float], draws: int = 1000, seed: int = 0
) -> dict:
    """The win rate at zero length difference: a logistic regression of each prompt's verdict (1, 0.5 or 0)
    on the length difference (the policy's answer minus the reference's, in tokens, scaled by its standard
    deviation), read at zero, as AlpacaEval 2's length-controlled win rate does (reduced to its length term;
    Dubois et al. 2024). Also the slope: how much a standard deviation of extra length moves the verdict's
    log-odds. The interval is a bootstrap over prompts. Fitted by Newton's method with a small ridge (written
    here: sklearn and statsmodels are not dependencies for one two-parameter fit; the ridge keeps the fit
    finite when length alone separates the verdicts)."""
    import torch

    y = torch.tensor(scores, dtype=torch.float64)
    d = torch.tensor(length_diff, dtype=torch.float64)
    if len(y) != len(d) or len(y) < 2:
        raise ValueError(f"need one length difference per verdict, at least 2 (got {len(y)} and {len(d)})")
    scale = float(d.std()) or 1.0
    x = torch.stack([torch.ones_like(d), d / scale], 1)

    def fit(idx: torch.Tensor) -> torch.Tensor:
        xs, ys, w = x[idx], y[idx], torch.zeros(2, dtype=torch.float64)
        ridge = 1e-3 * len(idx) * torch.eye(2, dtype=torch.float64)
        for _ in range(50):
            p = torch.sigmoid(xs @ w)
            grad = xs.T @ (p - ys) + ridge @ w
            hess = xs.T @ (xs * (p * (1 - p)).unsqueeze(1)) + ridge
            step = torch.linalg.solve(hess, grad)
            w = w - step
            if float(step.abs().max()) < 1e-10:
                break
        return w

    w = fit(torch.arange(len(y)))
    gen = torch.Generator().manual_seed(seed)
    boot = torch.stack([fit(torch.randint(0, len(y), (len(y),), generator=gen)) for _ in range(draws)])
    lc = torch.sigmoid(boot[:, 0])
    return {
        "win_rate": float(torch.sigmoid(w[0])),
        "ci95": [float(lc.quantile(0.025)), float(lc.quantile(0.975))],
        "length_slope": float(w[1]),  # log-odds per standard deviation of length difference
        "length_sd_tokens": scale,
        "mean_length_diff": float(d.mean()),
    }
