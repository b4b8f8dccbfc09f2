"""Phase 2, top to bottom: selectors -> candidates -> votes -> DPO -> win rate and the best-of-n probe.

One base model carries every adapter: the selector slot (each of the K selectors is loaded into it in turn),
the policy, and, when the judge is a saved selector, a judge slot. The DPO reference is that same base with
all adapters disabled.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from .. import distributed
from ..config import LoraSettings, ModelConfig, RunConfig
from ..data.pairs import prompt_hash
from ..federated.checkpoint import list_checkpoints, load_checkpoint
from ..models.adapters import (
    adapter_state,
    add_adapter,
    load_adapter_state,
    lora_metadata,
    read_adapter,
    save_adapter,
)
from ..models.loading import cache_root, load_model
from ..pipeline import SELECTOR, Workspace, open_workspace, train_federated
from ..runs import RunDir
from ..selector import build_encoder
from .baselines import POLICY, PolicyClient
from .dpo import (
    DPOResult,
    dpo_steps,
    encode_preferences,
    make_dpo_optimizer,
    reference_logps,
    response_logps,
    train_dpo,
)
from .evaluation import best_of_n_curve, win_rate
from .generation import encode_prompts, sample, stop_token_ids
from .judges import OpenAIJudge, SelectorJudge, VoteJudge
from .labelling import label_candidates

log = logging.getLogger(__name__)
JUDGE = "judge"


# ------------------------------------------------------------------------------------------ inputs
def load_selectors(run_dir: str | Path) -> dict:
    """The selectors of a finished phase-1 run: a federated run's newest round checkpoint (every selector), or
    a centralized run's one selector (checkpoints/selector.safetensors)."""
    folder = Path(run_dir) / "checkpoints"
    found = list_checkpoints(folder)
    if found:
        return load_checkpoint(found[-1]).selectors
    single = folder / f"{SELECTOR}.safetensors"
    if single.is_file():
        return {SELECTOR: read_adapter(single)[0]}
    raise FileNotFoundError(
        f"rlhf.selectors_from={run_dir}: neither a round-*.safetensors checkpoint (a federated run) nor "
        f"{SELECTOR}.safetensors (a centralized run) in {folder}"
    )


# what makes a selector the selector it was trained as: its adapter's shape and what it reads
_SELECTOR_FIELDS = {
    "model.lora": list(LoraSettings.model_fields),
    "selector": ["template", "max_length", "answer_a", "answer_b", "path"],
}


def with_selector_settings(cfg: RunConfig) -> RunConfig:
    """The config with rlhf.selectors_from's own LoRA and selector settings (as peft's from_pretrained reads an
    adapter's config): the selectors are adapters of that shape, trained to read that template. A setting
    left at its default takes the phase-1 run's value; one set to something else is an error naming it."""
    rl = cfg.rlhf
    if cfg.pipeline != "rlhf" or rl.method != "selectors" or not rl.selectors_from:
        return cfg
    path = Path(rl.selectors_from) / "config.yaml"
    if not path.is_file():
        return cfg  # load_selectors says what is missing
    theirs, ours = yaml.safe_load(path.read_text()), cfg.model_dump(mode="json")
    if theirs["model"]["name_or_path"] != ours["model"]["name_or_path"]:
        raise ValueError(
            f"model.name_or_path={ours['model']['name_or_path']!r}, but the selectors in {rl.selectors_from} are "
            f"adapters of {theirs['model']['name_or_path']!r}"
        )
    defaults = RunConfig().model_dump(mode="json")
    for section, fields in _SELECTOR_FIELDS.items():
        first, _, second = section.partition(".")
        mine, their, default = ((d[first][second] if second else d[first]) for d in (ours, theirs, defaults))
        for key in fields:
            if key not in their or mine[key] == their[key]:
                continue
            if mine[key] != default[key]:
                raise ValueError(
                    f"{section}.{key}={mine[key]!r}, but the selectors in {rl.selectors_from} were trained with "
                    f"{their[key]!r}: leave it unset (phase 2 reads the selectors' own settings)"
                )
            mine[key] = their[key]
    return RunConfig.model_validate(ours)


def choose_prompts(ws: Workspace) -> tuple[list[str], list[str], list[str]]:
    """(training prompts, evaluation prompts, the data's preferred answer to each evaluation prompt).

    Distinct prompts in a fixed order (by hash), training ones from the train split, evaluation ones from the
    evaluation split and never among the training prompts."""
    rl = ws.cfg.rlhf
    train = sorted({p.prompt for p in ws.data.all_train()}, key=prompt_hash)[: rl.num_prompts]
    # never a prompt the policy trained on: the selectors path trains on `train`, a baseline on every training
    # pair its clients hold
    seen = set(train) if rl.method == "selectors" else {p.prompt for p in ws.data.all_train()}
    preferred: dict[str, str] = {}
    for pairs in ws.data.all_test().values():
        for p in pairs:
            if p.prompt not in seen and p.hard_label is not None:
                preferred.setdefault(p.prompt, p.response_a if p.hard_label == 1 else p.response_b)
    if not preferred:
        raise ValueError("no evaluation prompts: set data.eval_split to a split with hard-labelled pairs")
    evals = sorted(preferred, key=prompt_hash)[: rl.eval_prompts]
    return train, evals, [preferred[p] for p in evals]


def build_judge(ws: Workspace, selectors: dict | None):
    """(judge, note on its independence)."""
    j, cfg = ws.cfg.rlhf.judge, ws.cfg
    batch = cfg.eval.batch_size  # a selector judge scores as the selectors do
    if j.kind == "openai":
        return OpenAIJudge(j.url, j.model, j.api_key_env, j.timeout_s), "an external model"
    if j.kind == "hf":
        if j.model is None:  # the run's own base model, adapters off, prompted with the comparison template
            # the base model with adapters off reads token ids: the full path (LoRA settings without top_layers)
            encoder, choice_ids = _encoder(ws, LoraSettings())
            return SelectorJudge(
                ws.model, encoder, choice_ids, None, None, "base model", batch
            ), "the untuned base model"
        model, tokenizer = load_model(
            ModelConfig(name_or_path=j.model, dtype=cfg.model.dtype, device=cfg.model.device)
        )
        # its own tokenizer and token ids, on the full path (no trunk of the run's model can serve it)
        encoder, choice_ids = _encoder(ws, LoraSettings(), tokenizer=tokenizer, model=model)
        return SelectorJudge(model, encoder, choice_ids, None, None, j.model, batch), f"{j.model}, untuned"
    if j.kind == "selector":  # the config requires its checkpoint
        state, meta = read_adapter(j.checkpoint)
        lora = LoraSettings(**json.loads(meta["lora"])) if "lora" in meta else cfg.model.lora
        if JUDGE not in ws.model.peft_config:
            ws.model = add_adapter(ws.model, JUDGE, lora, seed=0)
        encoder, choice_ids = _encoder(ws, lora)
        return SelectorJudge(
            ws.model, encoder, choice_ids, state, JUDGE, f"selector {j.checkpoint}", batch
        ), (f"the selector in {j.checkpoint}")
    # kind: phase1, chosen by name
    if not selectors:
        raise ValueError("rlhf.judge.kind=phase1 needs phase-1 selectors, and this run has none")
    name, state = next(iter(selectors.items()))
    return SelectorJudge(ws.model, ws.encoder, ws.choice_ids, state, SELECTOR, name, batch), (
        f"phase-1 {name}: NOT independent (it also labelled the training pairs; rlhf.judge.kind=phase1); set "
        "rlhf.judge.checkpoint to a selector trained on data the policy never saw"
    )


def _encoder(ws: Workspace, lora, tokenizer=None, model=None):
    """An encoder for a judge: the run's tokenizer and model unless the judge brings its own."""
    template = ws.cfg.rlhf.judge.template
    sel = ws.cfg.selector if template == "auto" else ws.cfg.selector.model_copy(update={"template": template})
    if lora.top_layers is None:  # a judge with LoRA in every block needs the full path
        sel = sel.model_copy(update={"path": "full"})
    return build_encoder(
        tokenizer or ws.tokenizer,
        sel,
        ws.cfg.data.source,
        model=model or ws.model,
        lora=lora,
        cache_dir=cache_root(ws.cfg.model) / "trunk",
        quiet=ws.quiet,
    )


# ------------------------------------------------------------------------------------------ phase 2
def run_rlhf(cfg: RunConfig, quiet: bool = False, resume: bool = False, overwrite: bool = False) -> dict:
    cfg = with_selector_settings(cfg)
    run = RunDir(cfg, resume=resume, overwrite=overwrite)
    try:
        ws = open_workspace(cfg, quiet)
        summary = Phase2(ws, run).run(resume)
        from ..report import write_report

        summary["report"] = str(write_report([run.path], run.path))
        return summary
    finally:
        run.close()


def _point(row: dict, *keys: str) -> dict:
    """A curve's point for the summary (best-of-n's or the one along DPO): ``keys``, the judge's and the
    selectors' win rates with their intervals, and the answers' length; the full reports stay in the log."""
    return {
        **{k: row[k] for k in keys},
        "judge": row["gold"]["win_rate"],
        "judge_ci95": row["gold"]["ci95"],
        "selectors": row["proxy"]["win_rate"],
        "selectors_ci95": row["proxy"]["ci95"],
        "mean_new_tokens": row["mean_new_tokens"],
    }


# what phase 2 logs (a baseline's rounds aside): the records a resumed run drops before it redoes phase 2
PHASE2_EVENTS = {"generation", "labels", "dpo", "winrate", "best_of_n", "curve", "phase2_done"}


class Phase2:
    def __init__(self, ws: Workspace, run: RunDir):
        self.ws, self.rundir, self.cfg, self.rl = ws, run, ws.cfg, ws.cfg.rlhf
        tok = ws.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.cache = cache_root(self.cfg.model) / "candidates"
        self.timings: dict[str, float] = {}
        self.reference_tokens: list[int] = []  # the evaluation references' lengths, for length control

    def _timed(self, key: str, start: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - start

    def _sample(self, prompts, adapter, seed, n=None, desc="generate"):
        start = time.perf_counter()
        out = sample(
            self.ws.model,
            self.ws.tokenizer,
            prompts,
            self.rl.generation,
            n=n,
            adapter=adapter,
            seed=seed,
            cache_dir=self.cache,
            quiet=self.ws.quiet,
            desc=desc,
        )
        self._timed("generation", start)
        self.rundir.log(
            {
                "event": "generation",
                "desc": desc,
                "prompts": len(prompts),
                "n": n or self.rl.generation.num_candidates,
                "mean_new_tokens": out.mean_length(),
                "from_cache": out.from_cache,
                "seconds": time.perf_counter() - start,
            }
        )
        return out

    def run(self, resume: bool = False) -> dict:
        cfg, rl, ws = self.cfg, self.rl, self.ws
        summary: dict = {"run_dir": str(self.rundir.path), "method": rl.method}
        start = time.perf_counter()
        selectors = None
        # a resumed baseline goes on from its last round checkpoint (_baseline drops the rounds after it)
        baseline_checkpoint = None
        if resume and rl.method != "selectors":
            baseline_checkpoint = next(reversed(list_checkpoints(self.rundir.checkpoints)), None)
        if baseline_checkpoint is not None:
            self.rundir.drop_events(PHASE2_EVENTS)  # the phase-2 records around its rounds are redone
        elif resume and not rl.trains_selectors:
            # nothing of phase 2 is checkpointed: a resumed run redoes it whole (its generations come back from
            # the cache), so the earlier attempt's records go
            self.rundir.truncate_metrics(-1)
        if rl.method == "selectors":
            if rl.selectors_from:
                selectors = load_selectors(rl.selectors_from)
                self.rundir.log({"event": "selectors", "from": rl.selectors_from, "names": list(selectors)})
            else:
                state, summary["phase1"] = train_federated(ws, self.rundir, resume)
                selectors = state.selectors
                if resume:  # phase 1 kept what its checkpoint had seen; phase 2 starts again after it
                    self.rundir.drop_events(PHASE2_EVENTS)
        self._timed("phase1", start)
        ws.model = add_adapter(ws.model, POLICY, rl.dpo.lora, seed=cfg.seed)
        train_prompts, eval_prompts, data_refs = choose_prompts(ws)

        # evaluation references: the initial policy's answers (adapters off) or the data's preferred answers
        if rl.reference == "initial":
            refs = self._sample(eval_prompts, None, cfg.seed + 500, n=1, desc="reference answers")
            reference, ref_len = [r[0] for r in refs.texts], refs.mean_length()
            self.reference_tokens = [n[0] for n in refs.new_tokens]
        else:
            reference, ref_len = data_refs, None
            # the data's answers in the policy's tokens, for the length-controlled win rate
            self.reference_tokens = [
                len(ws.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in reference
            ]
        judge, judge_note = build_judge(ws, selectors)
        summary["judge"] = judge_note
        curve = [self._win_rate(judge, eval_prompts, reference, None, -1, "initial policy")]

        kept: list[tuple[int, dict]] = []  # (DPO step, policy adapter) every rlhf.curve_every steps
        if rl.method == "selectors":
            optimizer = make_dpo_optimizer(ws.model, POLICY, rl.dpo)  # one optimizer across iterations
            step0 = 0
            for it in range(rl.iterations):
                adapter = None if it == 0 else POLICY  # the initial policy is the base: share its cache
                cands = self._sample(
                    train_prompts, adapter, cfg.seed + it, desc=f"candidates ({it + 1}/{rl.iterations})"
                )
                t = time.perf_counter()
                labels = label_candidates(
                    ws.model,
                    ws.encoder,
                    ws.choice_ids,
                    selectors,
                    cands,
                    slot=SELECTOR,
                    swap_average=rl.swap_average,
                    batch_size=cfg.eval.batch_size,
                )
                # under a launcher: every process trains on rank 0's pairs
                labels = distributed.broadcast_object(labels)
                self._timed("labelling", t)
                self.rundir.log(
                    {
                        "event": "labels",
                        "iteration": it,
                        **labels.summary(),
                        "seconds": time.perf_counter() - t,
                    }
                )
                if not labels.pairs:
                    raise ValueError(
                        "the selectors decided no candidate pair: nothing to train the policy on"
                    )
                result = self._dpo(labels.pairs, optimizer, it, step0, kept)
                step0 += result.steps
                self._save_policy(f"policy-iter{it}")
                if rl.mode == "iterative" and it < rl.iterations - 1:
                    curve.append(
                        self._win_rate(judge, eval_prompts, reference, POLICY, it, f"iteration {it + 1}")
                    )
                summary["labels"] = labels.summary()
        else:
            result = self._baseline(baseline_checkpoint)
        summary["dpo"] = {
            "steps": result.steps,
            "loss": result.loss,
            "reward_accuracy": result.reward_accuracy,
            "reward_margin": result.margin,
            "seconds": result.seconds,
        }
        path = self._save_policy("policy")
        curve.append(self._win_rate(judge, eval_prompts, reference, POLICY, rl.iterations, "tuned policy"))
        summary["initial"], summary["final"] = curve[0], curve[-1]
        summary["reference_mean_new_tokens"] = ref_len
        if rl.best_of_n and selectors:
            summary["best_of_n"] = self._best_of_n(judge, selectors, eval_prompts, reference)
        if rl.curve_every:  # the config allows it only with selectors
            points = [(0, None), *kept]
            if points[-1][0] != step0:
                points.append((step0, adapter_state(ws.model, POLICY)))
            summary["curve"] = self._curve(judge, selectors, eval_prompts, reference, points, curve)
        summary["policy_checkpoint"] = str(path)
        summary["seconds"] = dict(self.timings, total=time.perf_counter() - start)
        self.rundir.log({"event": "phase2_done", **{k: v for k, v in summary.items() if k != "phase1"}})
        return summary

    # -------------------------------------------------------------------------------- pieces
    def _dpo(self, pairs, optimizer, iteration: int, step0: int, kept: list):
        ws, rl = self.ws, self.rl
        t = time.perf_counter()
        prefs = encode_preferences(
            ws.tokenizer, pairs, rl.generation, stops=stop_token_ids(ws.model, ws.tokenizer)
        )
        ref = reference_logps(ws.model, prefs, self.pad_id, batch_size=rl.dpo.batch_size)
        self._timed("reference", t)
        t = time.perf_counter()
        bar = tqdm(total=dpo_steps(rl.dpo, len(prefs)), desc="DPO", unit="step", disable=ws.quiet)

        def step_done(step: int, total: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(1)
            if rl.curve_every and (step0 + step) % rl.curve_every == 0:  # a CPU copy: a few MB
                kept.append((step0 + step, adapter_state(ws.model, POLICY)))

        result = train_dpo(
            ws.model,
            POLICY,
            prefs,
            ref,
            rl.dpo,
            self.pad_id,
            seed=self.cfg.seed + iteration,
            optimizer=optimizer,
            progress=step_done,
            on_log=lambda h: self.rundir.log(
                {"event": "dpo", "iteration": iteration, **h, "step": step0 + h["step"]}
            ),
        )
        bar.close()
        self._timed("dpo", t)
        return result

    def _baseline(self, checkpoint: Path | None = None):
        """FedDPO / federated SFT of the policy adapter on the clients' own human pairs (local engine). From a
        round ``checkpoint`` (a resumed run) it goes on with its policy adapter and, with
        federated.reset_optimizer=false, the clients' optimizer states, and ends with the adapter an
        uninterrupted run ends with."""
        from ..federated.algorithm import Algorithm
        from ..federated.checkpoint import ServerState
        from ..federated.local_engine import LocalTransport
        from ..federated.rounds import RoundLoop

        ws, cfg = self.ws, self.cfg
        fed = cfg.federated.model_copy(update={"algorithm": "fedbis"})
        # the round log's rate is the policy's (rlhf.dpo.lr), not train.lr, which a baseline leaves unset
        train = cfg.train.model_copy(update={"lr": cfg.rlhf.dpo.lr})
        run_cfg = cfg.model_copy(update={"federated": fed, "train": train})
        clients = [
            PolicyClient(i, c, ws.tokenizer, cfg, sft=self.rl.method == "fedsft")
            for i, c in enumerate(ws.data.clients.values())
        ]
        algorithm = Algorithm(fed, [c.name for c in clients], cfg.seed)
        # the policy's quality is judged after training (win rate), so the loop runs without an evaluator
        transport = LocalTransport(run_cfg, ws.model, clients, ws.quiet)
        engine = RoundLoop(run_cfg, algorithm, self.rundir, transport, None, ws.quiet)
        t = time.perf_counter()
        state = ServerState(0, {"selector-0": adapter_state(ws.model, POLICY)})
        if checkpoint is not None:
            state = load_checkpoint(checkpoint)
            self.rundir.truncate_metrics(state.round)  # the rounds the checkpoint had not seen are redone
            for c in clients:
                c.optimizer_state = state.optimizer_states.get(c.name)
        state = engine.run_rounds(state)
        load_adapter_state(ws.model, POLICY, state.selectors["selector-0"], where="federated policy")
        self._timed("dpo", t)
        rounds = [r for r in self.rundir.records() if r["event"] == "round"]
        losses = [c["loss"] for r in rounds for c in r["clients"]]
        accs = [c["accuracy"] for r in rounds for c in r["clients"]]
        margins = [c.get("margin", 0.0) for r in rounds for c in r["clients"]]

        return DPOResult(  # summed up from the engine's per-round client records
            steps=fed.rounds * fed.local_steps,
            loss=sum(losses) / len(losses),
            reward_accuracy=sum(accs) / len(accs),
            margin=sum(margins) / len(margins),
            seconds=time.perf_counter() - t,
        )

    def _save_policy(self, name: str) -> Path:
        path = self.rundir.checkpoints / f"{name}.safetensors"
        save_adapter(adapter_state(self.ws.model, POLICY), path, lora_metadata(self.rl.dpo.lora))
        return path

    def _win_rate(self, judge, prompts, reference, adapter, iteration: int, label: str) -> dict:
        answers = self._sample(
            prompts, adapter, self.cfg.seed + 1000 + iteration, n=1, desc=f"answers ({label})"
        )
        t = time.perf_counter()
        lengths = ([n[0] for n in answers.new_tokens], self.reference_tokens[: len(prompts)])
        report = win_rate(judge, prompts, [a[0] for a in answers.texts], reference, lengths)
        self._timed("judging", t)
        report.update(iteration=iteration, label=label, mean_new_tokens=answers.mean_length())
        self.rundir.log({"event": "winrate", **report})
        return report

    def _vote(self, selectors) -> VoteJudge:
        """The labelling selectors as a judge (their vote): best-of-n's picker and the curves' proxy."""
        ws = self.ws
        return VoteJudge(
            ws.model,
            ws.encoder,
            ws.choice_ids,
            selectors,
            SELECTOR,
            self.rl.swap_average,
            self.cfg.eval.batch_size,
        )

    def _best_of_n(self, judge, selectors, prompts, reference) -> dict:
        """Sample n answers, let the selectors pick by knockout, and judge the picks for n = 1, 2, 4, ... n
        against the reference, by the judge and by the selectors themselves: a pick the selectors like more
        and more while the judge does not is the signature of reward hacking (Gao et al. 2022)."""
        rl = self.rl
        prompts, reference = prompts[: rl.best_of_n_prompts], reference[: rl.best_of_n_prompts]
        samples = self._sample(
            prompts, POLICY, self.cfg.seed + 2000, n=rl.best_of_n, desc=f"best-of-{rl.best_of_n}"
        )
        t = time.perf_counter()
        picker = self._vote(selectors)
        curve = best_of_n_curve(
            picker,
            judge,
            prompts,
            samples.texts,
            reference,
            lengths=samples.new_tokens,
            baseline_lengths=self.reference_tokens[: len(prompts)],
        )
        report = {
            "n": rl.best_of_n,
            "prompts": len(prompts),
            "pick_vs_reference": curve[-1]["gold"],
            "first_vs_reference": curve[0]["gold"],
            "pick_mean_new_tokens": curve[-1]["mean_new_tokens"],
            "first_mean_new_tokens": curve[0]["mean_new_tokens"],
            "curve": [_point(r, "n", "kl_bon") for r in curve],
        }
        self._timed("best_of_n", t)
        self.rundir.log({"event": "best_of_n", **report})
        return report

    def _curve(self, judge, selectors, prompts, reference, points, winrates) -> list[dict]:
        """The over-optimization curve: each kept policy (step 0: the initial one) answers the evaluation
        prompts, with the seed of the final evaluation, so the points differ by the policy alone; the judge and
        the selectors' vote (the proxy: they labelled the training pairs) compare the answers with the
        reference. x: the answers' mean log-ratio to the reference policy. The first and the last point's
        answers are the initial and the tuned policy's of the win rates (``winrates``), whose judge verdicts
        are reused. The live policy is the final one again afterwards."""
        ws, rl = self.ws, self.rl
        proxy = self._vote(selectors)
        final = adapter_state(ws.model, POLICY)
        lengths_ref = self.reference_tokens[: len(prompts)]
        rows = []
        try:
            for k, (step, state) in enumerate(points):
                if state is None:  # the initial policy: the base, adapters off, as in its win rate
                    adapter, seed = None, self.cfg.seed + 1000 - 1
                else:
                    load_adapter_state(ws.model, POLICY, state)
                    adapter, seed = POLICY, self.cfg.seed + 1000 + rl.iterations
                answers = self._sample(prompts, adapter, seed, n=1, desc=f"answers (DPO step {step})")
                texts = [a[0] for a in answers.texts]
                lengths = ([n[0] for n in answers.new_tokens], lengths_ref)
                t = time.perf_counter()
                if k == 0 or k == len(points) - 1:
                    gold = winrates[0 if k == 0 else -1]
                else:
                    gold = win_rate(judge, prompts, texts, reference, lengths)
                row = {
                    "step": step,
                    "log_ratio": 0.0 if adapter is None else self._log_ratio(prompts, answers),
                    "gold": gold,
                    "proxy": win_rate(proxy, prompts, texts, reference, lengths),
                    "mean_new_tokens": answers.mean_length(),
                }
                self._timed("curve", t)
                self.rundir.log({"event": "curve", **row})
                rows.append(row)
        finally:
            load_adapter_state(ws.model, POLICY, final)
        return [_point(r, "step", "log_ratio") for r in rows]

    @torch.no_grad()
    def _log_ratio(self, prompts, answers) -> float:
        """Mean over prompts of log pi(y | x) - log pi_ref(y | x) on the policy's own answers y, scored on the
        ids it sampled: the one-sample estimate of KL(policy || reference) when sampling at temperature 1 without
        top-p; with the run's sampling settings, a measure in nats of how far the policy moved (the x axis of Gao
        et al.'s curves)."""
        ws = self.ws
        ids = encode_prompts(ws.tokenizer, prompts, self.rl.generation)
        replies = [t[0] for t in answers.tokens]
        was_training = ws.model.training
        ws.model.eval()
        ws.model.set_adapter(POLICY)
        total, size = 0.0, self.cfg.eval.batch_size
        try:
            for i in range(0, len(prompts), size):
                policy = response_logps(ws.model, ids[i : i + size], replies[i : i + size], self.pad_id)
                with ws.model.disable_adapter():
                    ref = response_logps(ws.model, ids[i : i + size], replies[i : i + size], self.pad_id)
                total += float((policy.float() - ref.float()).sum())
        finally:
            ws.model.train(was_training)
        return total / len(prompts)
