"""The Flower ServerApp: the shared round loop (federated/rounds.py) with a transport over Flower's Grid.

Sampling, FedBis averaging, FedBiscuit's warm-up, grouping and per-cluster aggregation, fault containment,
checkpoints and resume are the local engine's own code; this file only turns "train these clients" and
"score these selectors on every client" into Messages, and learns which node holds which client.

Node ids are not client ids (they are random, and a restarted SuperNode comes back with a new one): an
``identify`` query asks each new node which client it holds. A client is reached through the newest node
that said it holds it, so a node that rejoins after a crash simply takes its client back.
"""

from __future__ import annotations

import json
import logging
import time

import yaml
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from ..config import RunConfig, check_one_order_is_centralized, config_from_dict
from ..federated.client import ScoreReply, TrainReply
from ..federated.rounds import TooFewClientsError, TrainJob
from ..models.adapters import AdapterState
from ..runs import RunDir
from . import messages as m

log = logging.getLogger(__name__)
POLL_S = 0.2  # between pulls for replies (Grid.send_and_receive sleeps 3 s)

app = ServerApp()


class FlowerTransport:
    def __init__(self, grid: Grid, cfg: RunConfig, run: RunDir | None = None):
        self.grid, self.cfg, self.run = grid, cfg, run
        self.flower = cfg.federated.flower
        self.config_json = json.dumps(cfg.model_dump(mode="json"))
        self.identities: dict[int, m.Identity] = {}  # node id -> what it said it holds
        self.node_of: dict[str, int] = {}  # client -> node id (the newest that holds it)
        self.clients: list[str] = []  # every client of the run (fixed by discover)
        self.suspects: set[int] = set()  # nodes whose last message failed (crashed, or just slow)

    # ---------------------------------------------------------------- messages
    def _exchange(self, requests: dict[str, Message], kind: str, round_: int) -> dict[str, Message | str]:
        """Push one message per key, pull until every reply is in or the timeout passes.

        Returns key -> reply, or why there is none (an error reply, or no reply in time)."""
        if not requests:
            return {}
        start = time.perf_counter()
        keys = list(requests)
        down = {k: m.wire_bytes(requests[k]) for k in keys}
        ids = list(self.grid.push_messages([requests[k] for k in keys]))
        pending = {mid: k for k, mid in zip(keys, ids, strict=True) if mid}
        out: dict[str, Message | str] = {
            k: "could not be sent" for k, mid in zip(keys, ids, strict=True) if not mid
        }
        arrived: dict[str, float] = {}
        deadline = time.monotonic() + self.flower.reply_timeout_s
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                key = pending.pop(reply.metadata.reply_to_message_id, None)
                if key is None:
                    continue
                arrived[key] = time.perf_counter() - start
                out[key] = (
                    f"error reply ({reply.error.code}): {reply.error.reason}" if reply.has_error() else reply
                )
            if pending:
                time.sleep(POLL_S)
        for key in pending.values():
            out[key] = f"no reply within {self.flower.reply_timeout_s:g} s"
        if self.run is not None:
            self.run.log(
                {
                    "event": "messages",
                    "round": round_,
                    "kind": kind,
                    "down_bytes": down,
                    "up_bytes": {k: m.wire_bytes(v) for k, v in out.items() if isinstance(v, Message)},
                    "reply_seconds": arrived,
                    "failed": {k: v for k, v in out.items() if isinstance(v, str)},
                    "seconds": time.perf_counter() - start,
                }
            )
        return out

    def _message(self, content, node: int, kind: str) -> Message:
        # A message lives as long as the server waits for it: a dead node's work does not linger.
        return Message(content, node, kind, ttl=self.flower.reply_timeout_s + 60)

    # ---------------------------------------------------------------- which node holds which client
    def refresh(self, round_: int = -1) -> None:
        """Identify nodes the server has not seen, and suspects whose client has not come back elsewhere;
        forget nodes the SuperLink no longer lists."""
        online = set(self.grid.get_node_ids())
        for node in set(self.identities) - online:
            del self.identities[node]
        self.suspects &= online
        self.node_of = {c: n for c, n in self.node_of.items() if n in online}
        # new nodes first: a restarted SuperNode without authentication comes back under a new id
        self._identify(sorted(online - set(self.identities)), round_)
        # a node that failed its last message and still holds nobody's place is asked again (with
        # authentication a restarted SuperNode keeps its node id)
        self._identify(
            sorted(n for n in self.suspects if self.identities[n].client not in self.node_of), round_
        )

    def _identify(self, nodes: list[int], round_: int) -> None:
        requests = {
            str(n): self._message(m.RecordDict({m.TASK: m.task_record(self.config_json)}), n, m.IDENTIFY)
            for n in nodes
        }
        for key, reply in self._exchange(requests, "identify", round_).items():
            node = int(key)
            if isinstance(reply, str):
                log.warning("node %d did not identify itself: %s", node, reply)
                continue
            identity = m.read_identity(reply.content)
            self.identities[node] = identity
            self.suspects.discard(node)
            previous = self.node_of.get(identity.client)
            self.node_of[identity.client] = node  # the newest node wins: a restarted node takes over
            if previous is not None and previous != node:
                log.info("client %s moved from node %d to node %d", identity.client, previous, node)

    def _suspect(self, client: str) -> None:
        """The node holding ``client`` failed a message: it must identify itself again before more work."""
        node = self.node_of.pop(client, None)
        if node is not None:
            self.suspects.add(node)

    def discover(self) -> list[str]:
        """Wait until the expected clients have identified themselves; their names in partition order."""
        deadline = time.monotonic() + self.flower.wait_for_nodes_s
        while True:
            self.refresh()
            reported = {i.num_partitions for i in self.identities.values() if i.num_partitions}
            if len(reported) > 1:
                raise ValueError(f"the nodes disagree on num-partitions: {sorted(reported)}")
            expected = self.flower.num_clients or (reported.pop() if reported else None)
            clients = {i.client: i for i in self.identities.values()}
            if expected and len(clients) >= expected:
                break
            if time.monotonic() > deadline:
                raise TooFewClientsError(
                    f"after {self.flower.wait_for_nodes_s:g} s, {len(clients)} of {expected or '?'} clients "
                    f"had identified themselves ({sorted(clients)}); start the missing SuperNodes, or set "
                    "federated.flower.num_clients"
                )
            time.sleep(1.0)
        order = sorted(clients.values(), key=lambda i: (i.partition_id is None, i.partition_id, i.client))
        self.clients = [i.client for i in order]
        return self.clients

    def _await(self, clients, round_: int) -> None:
        """Refresh the node map; give clients without a node up to rejoin_wait_s to come back."""
        self.refresh(round_)
        deadline = time.monotonic() + self.flower.rejoin_wait_s
        while any(c not in self.node_of for c in clients) and time.monotonic() < deadline:
            time.sleep(1.0)
            self.refresh(round_)

    # ---------------------------------------------------------------- the Transport interface
    def train(self, jobs: dict[str, TrainJob], round_: int) -> dict[str, TrainReply | str]:
        self._await(jobs, round_)
        out: dict[str, TrainReply | str] = {}
        requests = {}
        for name, job in jobs.items():
            if name not in self.node_of:
                out[name] = "unreachable: no connected node holds this client"
                continue
            content = m.train_content(
                self.config_json, job.selector, job.state, job.seed, round_, job.probe, job.pairs or 0
            )
            requests[name] = self._message(content, self.node_of[name], m.TRAIN)
        for name, reply in self._exchange(requests, "train", round_).items():
            if isinstance(reply, str):
                self._suspect(name)
            try:
                out[name] = reply if isinstance(reply, str) else m.read_train_reply(reply.content)
            except (KeyError, TypeError, ValueError) as err:
                out[name] = f"malformed reply: {err}"
        return out

    def score(self, selectors: dict[str, AdapterState], round_: int) -> dict[str, ScoreReply | str]:
        self._await(self.clients, round_)
        names = list(selectors)
        requests = {
            client: self._message(m.score_content(self.config_json, selectors, round_), node, m.SCORE)
            for client, node in self.node_of.items()
        }
        out: dict[str, ScoreReply | str] = {}
        for client, reply in self._exchange(requests, "score", round_).items():
            if isinstance(reply, str):
                self._suspect(client)
            try:
                out[client] = reply if isinstance(reply, str) else m.read_score_reply(reply.content, names)
            except (KeyError, TypeError, ValueError) as err:
                out[client] = f"malformed reply: {err}"
        return out

    def optimizer_states(self) -> dict[str, dict]:
        return {}  # clients start every round with a fresh optimizer (checked in run_server)

    def client_sizes(self) -> dict[str, int]:
        return {i.client: i.train_pairs for i in self.identities.values()}  # as each node identified itself

    # ---------------------------------------------------------------- transport self-test
    def check_transport(self, megabytes: float) -> dict:
        """Send a synthetic adapter-like state of ``megabytes`` to every client and back; compare bit for bit."""
        import torch

        gen = torch.Generator().manual_seed(0)
        n = int(megabytes * 1e6 / 4)
        # one array larger than Flower's 5 MiB chunk when the payload allows it, the rest in LoRA-sized pieces
        sizes = [min(n, 1_600_000)] + [4608] * max(0, -(-(n - 1_600_000) // 4608))
        state = {f"layer.{i}.lora.weight": torch.randn(s, generator=gen) for i, s in enumerate(sizes)}
        requests = {
            c: self._message(m.RecordDict({m.STATE: m.state_record(state)}), node, m.ECHO)
            for c, node in self.node_of.items()
        }
        report = {
            "payload_bytes": sum(t.numel() * 4 for t in state.values()),
            "arrays": len(state),
            "clients": {},
        }
        for client, reply in self._exchange(requests, "echo", -1).items():
            if isinstance(reply, str):
                report["clients"][client] = reply
                continue
            back = m.record_state(reply.content[m.STATE])
            same = back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())
            report["clients"][client] = "identical" if same else "CHANGED"
        return report


def check_flower_config(cfg: RunConfig) -> None:
    check_one_order_is_centralized(cfg)
    fed = cfg.federated
    if cfg.pipeline != "federated" or fed.algorithm not in ("fedbis", "fedbiscuit"):
        raise ValueError(
            f"the Flower engine runs pipeline=federated with algorithm fedbis or fedbiscuit, got "
            f"pipeline={cfg.pipeline}, algorithm={fed.algorithm} (the baselines run on the local engine)"
        )
    if not fed.reset_optimizer:
        raise ValueError(
            "federated.reset_optimizer=false keeps optimizer state on clients between rounds; the Flower "
            "engine does not (each message may be a fresh process): use the local engine or reset_optimizer=true"
        )
    if cfg.eval.heldout_every is not None:
        raise ValueError(
            f"eval.heldout_every={cfg.eval.heldout_every}: the Flower server holds no client's held-out slice; "
            "tune on held-out slices with the local engine (fedbiscuit run), or leave it unset"
        )
    after_rounds = []  # what only the local engine does once the rounds are over (federated/population.py)
    if cfg.data.unseen_clients is not None:
        after_rounds.append(f"data.unseen_clients={cfg.data.unseen_clients!r}")
    if fed.personalize_steps:
        after_rounds.append(f"federated.personalize_steps={fed.personalize_steps}")
    if after_rounds:
        raise ValueError(
            f"{' and '.join(after_rounds)}: the Flower engine does not evaluate unseen clients or personalise after "
            "the rounds; the local engine does (fedbiscuit run)"
        )


def run_server(grid: Grid, cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """A whole federated run over ``grid``; writes the run folder as the local engine does."""
    from ..federated.algorithm import Algorithm
    from ..federated.evaluation import evaluate_selectors
    from ..federated.rounds import RoundLoop
    from ..pipeline import federated_summary, length_reference, open_workspace, start_state

    check_flower_config(cfg)
    run = RunDir(cfg, resume=resume, overwrite=overwrite)
    try:
        transport = FlowerTransport(grid, cfg, run)
        clients = transport.discover()
        log.info("clients: %s", clients)
        if cfg.federated.flower.check_transport_mb > 0:
            run.log(
                {
                    "event": "transport_check",
                    **transport.check_transport(cfg.federated.flower.check_transport_mb),
                }
            )
        evaluator = None
        if cfg.federated.flower.server_eval and cfg.data.eval_split:
            ws = open_workspace(cfg, quiet=True)  # the server's own copy of the evaluation split
            model = ws.model
            tests = {name: ws.encoder.encode(p, owner=name) for name, p in ws.data.all_test().items()}

            def evaluator(state, round_):
                return evaluate_selectors(
                    ws.model,
                    ws.encoder,
                    ws.choice_ids,
                    state.selectors,
                    tests,
                    state.clusters,
                    cfg.eval.batch_size,
                    min_client_pairs=cfg.eval.min_client_pairs,
                )
        else:
            model = _base_model(cfg)
        algorithm = Algorithm(cfg.federated, clients, cfg.seed)
        sizes = {
            transport.identities[n].client: transport.identities[n].train_pairs
            for n in transport.node_of.values()
        }
        reference = length_reference(ws.data, ws.tokenizer) if evaluator else {}
        state, resumed = start_state(
            cfg, run, model, algorithm, resume, {"clients": sizes, "engine": "flower", **reference}
        )
        loop = RoundLoop(cfg, algorithm, run, transport, evaluator, quiet=True)
        if not resumed and cfg.eval.before_training:
            loop.evaluate(state, 0)
        state = loop.run_rounds(state)
        return federated_summary(run, state)
    finally:
        run.close()


def _base_model(cfg: RunConfig):
    """The base model with its adapter slot: the initial selectors are made from it, as on the local engine."""
    from ..models.adapters import add_adapter
    from ..models.loading import load_model
    from ..pipeline import SELECTOR
    from ..runs import seed_everything

    seed_everything(cfg.seed)
    model, _ = load_model(cfg.model, seed=cfg.seed)
    return add_adapter(model, SELECTOR, cfg.model.lora, seed=cfg.seed)


def config_from_run_config(run_config: dict) -> RunConfig:
    """The fedbiscuit config a Flower app carries in [tool.flwr.app.config] (see deploy.py)."""
    text = run_config.get("fedbiscuit-config")
    if not text:
        raise ValueError(
            "the Flower run config has no 'fedbiscuit-config': build the app with `fedbiscuit flower-app`"
        )
    return config_from_dict(yaml.safe_load(str(text)), "the Flower app's fedbiscuit-config")


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config_from_run_config(dict(context.run_config))
    result = run_server(
        grid,
        cfg,
        resume=bool(context.run_config.get("resume", False)),
        overwrite=bool(context.run_config.get("overwrite", False)),
    )
    print(json.dumps({k: result[k] for k in ("run_dir", "rounds", "clusters", "faults")}), flush=True)
