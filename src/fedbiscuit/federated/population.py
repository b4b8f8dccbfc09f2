"""After the rounds: how the final selectors serve people, beyond the clients that trained them.

- Unseen clients (``data.unseen_clients``) took no part in training. Each scores every final selector on its
  labelled slice exactly as a grouping round scores (SelectorClient.score, ``grouping_pairs`` of it), joins
  the selector with the lowest loss, and is judged on its remaining pairs: by the selector it joined ("own"),
  by every selector, and by their vote (evaluation.evaluate_selectors).
- Personalisation (``federated.personalize_steps``): every client fine-tunes a copy of the selector it would
  use (FedBis's one; FedBiscuit's own cluster's, or for an unseen client the one it joined) for a few local
  steps, a seen client on its training pairs and an unseen client on its labelled slice, and is judged on its
  own test pairs (an unseen client's remaining pairs). Each copy is scored and dropped before the next client
  starts, so memory does not grow with the clients.

Plain functions over SelectorClient objects and the shared model, like the round loop: what a client does is
client.py's; what is decided here is which selector each client starts from. No transport.
"""

from __future__ import annotations

import math

from ..config import RunConfig
from ..models.adapters import AdapterState
from ..selector.metrics import pair_correct, paired_comparison
from .client import SelectorClient, client_seed
from .evaluation import Scored, concat, evaluate_selectors, own_report, score_state

# client_seed salt for the personalisation steps: their batches and dropout differ from any round's.
PERSONALIZE_SALT = 17


def join_selectors(
    model, clients: list[SelectorClient], selectors: dict[str, AdapterState], cfg: RunConfig
) -> tuple[dict[str, str], dict[str, dict[str, float]], dict[str, str]]:
    """(client -> the selector it joins, every client's losses, client -> why it could not score).

    A client joins the selector with the lowest mean loss on its labelled (held-out) slice, the first name on a
    tie; with one selector there is nothing to choose and every client joins it.
    """
    names = list(selectors)
    if len(names) == 1:  # nothing to choose: no client spends forward passes on it
        return {c.name: names[0] for c in clients}, {}, {}
    assignment, losses, unscored = {}, {}, {}
    for client in clients:
        try:
            row = client.score(model, selectors, cfg.federated.fedbiscuit.grouping_pairs, cfg.eval.batch_size)
        except Exception as err:  # one client's failure is reported, as in a grouping round
            unscored[client.name] = f"raised {type(err).__name__}: {err}"
            continue
        if not all(math.isfinite(v) for v in row.losses.values()):
            unscored[client.name] = "non-finite loss"
            continue
        losses[client.name] = row.losses
        assignment[client.name] = min(names, key=lambda s: (row.losses[s], names.index(s)))
    return assignment, losses, unscored


def evaluate_unseen(
    model, clients: list[SelectorClient], selectors: dict[str, AdapterState], cfg: RunConfig
) -> dict:
    """Join, then judge every unseen client's remaining pairs: per selector, the vote of several, and "own"."""
    assignment, losses, unscored = join_selectors(model, clients, selectors, cfg)
    encoder, choice_ids = clients[0].encoder, clients[0].choice_ids
    tests = {c.name: encoder.encode(c.data.test, owner=c.name) for c in clients}
    report = evaluate_selectors(
        model,
        encoder,
        choice_ids,
        selectors,
        tests,
        assignment,
        cfg.eval.batch_size,
        min_client_pairs=cfg.eval.min_client_pairs,
    )
    if len(selectors) == 1:  # FedBis: the one selector is every client's own
        report["own"] = next(iter(report["selectors"].values()))
    return {
        "clients": {
            c.name: {"labelled": len(c.data.heldout), "remaining": len(c.data.test)} for c in clients
        },
        "assignment": assignment,
        "losses": losses,
        "unscored": unscored,
        **report,
    }


def own_selectors(
    model, clients: list[SelectorClient], selectors: dict[str, AdapterState], clusters: dict[str, str], cfg
) -> dict[str, str]:
    """The selector each trained client uses: its cluster's (FedBiscuit), its own (the local baseline), the
    only one (FedBis, centralized). A FedBiscuit run that ended before its first grouping has no clusters: its
    clients then join the best selector on their held-out slice, as unseen clients do."""
    if cfg.federated.algorithm == "local":
        return {c.name: c.name for c in clients if c.name in selectors}
    out = {c.name: clusters[c.name] for c in clients if c.name in clusters}
    rest = [c for c in clients if c.name not in out]
    if rest:
        out.update(join_selectors(model, rest, selectors, cfg)[0])
    return out


def personalize(
    model,
    clients: list[SelectorClient],
    start: dict[str, str],
    selectors: dict[str, AdapterState],
    cfg: RunConfig,
    round_: int,
    on_labelled_slice: bool = False,
) -> dict:
    """Each client fine-tunes selectors[start[client]] for ``personalize_steps`` and is judged on its test
    pairs by the selector it started from ("global") and by its personalised copy ("personalized"), with the
    paired test between the two. ``on_labelled_slice``: fine-tune on the held-out slice (unseen clients)."""
    fed, batch = cfg.federated, cfg.eval.batch_size
    before: list[Scored] = []
    after: list[Scored] = []
    skipped: dict[str, str] = {}
    for client in clients:
        if client.name not in start:
            skipped[client.name] = "no selector to start from (it could not score them)"
            continue
        tests = client.encoder.encode(client.data.test, owner=client.name)
        if not tests:
            skipped[client.name] = "no test pairs"
            continue
        state = selectors[start[client.name]]
        encoder, choice_ids = client.encoder, client.choice_ids
        before.append(score_state(model, encoder, choice_ids, state, tests, batch))
        try:
            reply = client.train(
                model,
                state,
                cfg.train,
                fed.personalize_steps,
                client_seed(cfg.seed, round_, client.index, PERSONALIZE_SALT),
                reset_optimizer=True,  # a fresh AdamW: the personalised copy owes nothing to any round's state
                pairs=client.scoring_pairs(None) if on_labelled_slice else None,
            )
        except Exception as err:
            before.pop()
            skipped[client.name] = f"raised {type(err).__name__}: {err}"
            continue
        after.append(score_state(model, encoder, choice_ids, reply.state, tests, batch))
        del reply  # the personalised copy is evaluated, never kept
    out: dict = {"selector": {c: s for c, s in start.items() if c not in skipped}, "skipped": skipped}
    if before:
        out["global"] = own_report(before, cfg.eval.min_client_pairs)
        out["personalized"] = own_report(after, cfg.eval.min_client_pairs)
        out["paired"] = paired_comparison(pair_correct(*concat(before)), pair_correct(*concat(after)))
    return out


def after_training(
    model,
    seen: list[SelectorClient],
    unseen: list[SelectorClient],
    selectors: dict[str, AdapterState],
    clusters: dict[str, str],
    cfg: RunConfig,
    round_: int,
    log,
) -> None:
    """The unseen clients' evaluation and the personalisation baseline, each logged as one record."""
    joined: dict[str, str] = {}
    if unseen:
        report = evaluate_unseen(model, unseen, selectors, cfg)
        joined = report["assignment"]
        log({"event": "unseen", "round": round_, **report})
    if cfg.federated.personalize_steps:
        record = {
            "event": "personalized",
            "round": round_,
            "steps": cfg.federated.personalize_steps,
            "seen": personalize(
                model, seen, own_selectors(model, seen, selectors, clusters, cfg), selectors, cfg, round_
            ),
        }
        if unseen:
            record["unseen"] = personalize(
                model, unseen, joined, selectors, cfg, round_, on_labelled_slice=True
            )
        log(record)
