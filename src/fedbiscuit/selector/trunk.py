"""The cached selector path: the frozen blocks run once per pair, only the top blocks run per step.

With LoRA in the last N decoder blocks only (``model.lora.top_layers``), everything below block L-N is the
frozen base model: its output for a given sequence never changes. A client computes it once per pair, keeps
it on its own disk, and from then on training, held-out scoring, evaluation and labelling run only the top N
blocks (the last one's MLP only at the answer position), the final norm and the two answer rows of the
output layer.

The two presentation orders share every token before the first response (template head, prompt, "Reply A:"),
so that prefix runs once, in the trunk and in the top blocks alike: the (a, b) order runs whole and the (b, a)
order's suffix runs on the keys and values its prefix left in the cache. A pair costs (prefix + 2 suffixes)
positions, not 2 x (prefix + suffix), and its prefix is stored once.

The store is content-addressed: a folder per (frozen weights, template, truncation, split point, dtype), an
entry per pair keyed by a hash of its token ids after truncation. It serves every later run on the same data,
centralized or federated, any seed. One append-only data file, read memory-mapped, and a JSON index written
atomically every few seconds; a crash mid-build loses at most the entries after the last index write, and
the next build resumes. States never leave the client: nothing here is part of a reply.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..durable import durable_write_text
from .encoding import EncodedPair, PairEncoder, padded_width
from .prompts import Template
from .scoring import _base, answer_logits

FORMAT = 1
COMMIT_SECONDS = 10.0
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}  # bf16 as raw bits


class TrunkUnsupportedError(ValueError):
    """The model's decoder cannot be split into cached blocks and top blocks."""


@contextmanager
def decoder_slice(model, start: int, stop: int, final_norm: bool):
    """The model's decoder running only blocks [start, stop), with its final norm or without.

    The decoder's own forward still does everything around the blocks (rotary embeddings, the causal and
    padding mask), so the split is exact for any decoder that loops over ``layers`` and ends in ``norm``
    (Llama, SmolLM2, Qwen2, Mistral, ...); ``CachedEncoder`` checks this on the model before using it.
    """
    dec = _base(model).get_decoder()
    if not isinstance(getattr(dec, "layers", None), nn.ModuleList) or not hasattr(dec, "norm"):
        raise TrunkUnsupportedError(
            f"selector.path=cached needs a decoder with `layers` and `norm` ({type(dec).__name__} has not): "
            "use selector.path=full"
        )
    layers, norm = dec.layers, dec.norm
    dec.layers = nn.ModuleList(list(layers)[start:stop])
    if not final_norm:
        dec.norm = nn.Identity()
    try:
        yield dec
    finally:
        dec.layers, dec.norm = layers, norm


def _adapters_off(model):
    from peft import PeftModel

    return model.disable_adapter() if isinstance(model, PeftModel) else nullcontext()


def pair_key(pair: EncodedPair) -> str:
    h = hashlib.blake2b(digest_size=16)
    for ids in (pair.prompt, pair.a, pair.b):
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


def trunk_identity(model, start: int, pieces, max_length: int) -> dict:
    """What the cached states depend on: the frozen weights below ``start``, the template, the truncation."""
    base = _base(model)
    dec = base.get_decoder()
    h = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        modules = (
            [dec.embed_tokens, *list(dec.layers)[:start]]
            if hasattr(dec, "embed_tokens")
            else list(dec.layers)[:start]
        )
        for module in modules:
            for name, p in module.named_parameters():
                if "lora_" in name:  # another adapter (a policy's) is switched off for the trunk pass
                    continue
                h.update(p.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    dtype = next(base.parameters()).dtype
    return {
        "format": FORMAT,
        "model": type(base).__name__,
        "weights": h.hexdigest(),
        "start": start,
        "hidden": int(base.config.hidden_size),
        "dtype": str(dtype).removeprefix("torch."),
        "pieces": [list(p) for p in pieces],
        "max_length": max_length,
    }


class TrunkStore:
    """Per-pair trunk states on disk: append-only ``states.bin``, ``index.json`` {key: [offset, P, S]}."""

    def __init__(self, folder: Path, identity: dict):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.width = identity["hidden"]
        self.dtype = getattr(torch, identity["dtype"])
        self.np_dtype = _NUMPY[self.dtype]
        self.itemsize = np.dtype(self.np_dtype).itemsize
        meta = self.folder / "meta.json"
        if meta.is_file():
            found = json.loads(meta.read_text())
            if found != identity:
                raise ValueError(f"{meta} belongs to other weights or settings; remove {self.folder}")
        else:
            durable_write_text(meta, json.dumps(identity))
        self.data_path = self.folder / "states.bin"
        self.index_path = self.folder / "index.json"
        self.index: dict[str, list[int]] = {}
        self._map: np.memmap | None = None
        self.reload()

    def reload(self) -> None:
        if self.index_path.is_file():
            try:
                self.index = json.loads(self.index_path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{self.index_path} is not valid JSON ({err}); remove {self.folder}"
                ) from None
        self._map = None

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    @property
    def end(self) -> int:
        """Elements (not bytes) covered by the index: anything after this is a torn write."""
        return max((o + (p + 2 * s) * self.width for o, p, s in self.index.values()), default=0)

    @property
    def nbytes(self) -> int:
        return self.end * self.itemsize

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prefix [P, d], suffix in order (a, b) [S, d], suffix in order (b, a) [S, d]), copied out."""
        offset, p, s = self.index[key]
        stop = offset + (p + 2 * s) * self.width
        if self._map is None or self._map.shape[0] < stop:
            self._map = np.memmap(self.data_path, dtype=self.np_dtype, mode="r")
        block = (
            torch.from_numpy(np.array(self._map[offset:stop])).view(self.dtype).view(p + 2 * s, self.width)
        )
        return block[:p], block[p : p + s], block[p + s :]

    @contextmanager
    def writer(self):
        """Exclusive append access (other processes sharing the folder wait), torn tails dropped first."""
        with open(self.folder / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.reload()  # another process may have added entries meanwhile
                end = self.nbytes
                with open(self.data_path, "ab") as fh:
                    if fh.tell() != end:
                        fh.truncate(end)
                        fh.seek(end)
                    yield _Appender(self, fh, end // self.itemsize)
            finally:
                self._map = None
                fcntl.flock(lock, fcntl.LOCK_UN)

    def commit(self, fh) -> None:
        fh.flush()
        os.fsync(fh.fileno())
        durable_write_text(self.index_path, json.dumps(self.index))


class _Appender:
    def __init__(self, store: TrunkStore, fh, offset: int):
        self.store, self.fh, self.offset = store, fh, offset

    def add(self, key: str, prefix: torch.Tensor, ab: torch.Tensor, ba: torch.Tensor) -> None:
        block = torch.cat([prefix, ab, ba]).to("cpu").contiguous()
        raw = block.view(torch.uint16) if block.dtype == torch.bfloat16 else block
        self.fh.write(raw.numpy().tobytes())
        self.store.index[key] = [self.offset, prefix.shape[0], ab.shape[0]]
        self.offset += block.numel()

    def commit(self) -> None:
        self.store.commit(self.fh)


class CachedEncoder(PairEncoder):
    """A PairEncoder whose pairs reach the model as cached trunk states instead of token ids.

    ``encode`` tokenises as before and then makes sure every pair has its trunk states (computing the missing
    ones with the frozen base, adapters off); ``logits`` runs the top blocks on them.
    """

    def __init__(
        self,
        tokenizer,
        template: Template,
        max_length: int,
        model,
        top_layers: int,
        root: str | Path,
        build_tokens: int = 4096,
        quiet: bool = True,
    ):
        super().__init__(tokenizer, template, max_length)
        self.model = model
        self.num_layers = len(_base(model).get_decoder().layers)
        if not 0 < top_layers <= self.num_layers:
            raise ValueError(f"model.lora.top_layers={top_layers} but the model has {self.num_layers} blocks")
        self.start = self.num_layers - top_layers
        self.build_tokens = build_tokens  # positions per trunk batch while building
        self.quiet = quiet
        # The second order's suffix sits after its padded prefix, so its distance to a prefix key is off by that
        # padding; a sliding window shorter than the sequences would then cut at the wrong keys. Such models
        # run both orders whole (exact; the trunk build about 20% slower).
        window = sliding_window(_base(model).config)
        self.share_prefix = window is None or window >= max_length
        self._check_split()
        identity = trunk_identity(model, self.start, self.pieces, max_length)
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
        self.store = TrunkStore(Path(root).expanduser() / digest, identity)
        self.stats = {"built": 0, "found": 0}

    # ------------------------------------------------------------------------------------------ building
    def encode(self, pairs, owner=None) -> list[EncodedPair]:
        encoded = super().encode(pairs, owner)
        self.prepare(encoded)
        return encoded

    def prepare(self, pairs: list[EncodedPair]) -> int:
        """Compute and store the trunk states of every pair not yet stored; returns how many were built."""
        keys = {pair_key(p): p for p in pairs}
        missing = [k for k in keys if k not in self.store]
        self.stats["found"] += len(keys) - len(missing)
        if not missing:
            return 0
        with self.store.writer() as out:
            missing = [k for k in missing if k not in self.store]  # another process may have built some
            # similar prefix lengths together: little padding in the trunk pass
            missing.sort(key=lambda k: (self.length(keys[k]), len(keys[k].a) + len(keys[k].b)))
            bar = tqdm(
                total=len(missing), desc="cache frozen blocks", unit="pair", disable=self.quiet, leave=False
            )
            i, committed = 0, time.monotonic()
            while i < len(missing):
                j, widest = i, 0
                while j < len(missing):
                    p = keys[missing[j]]
                    widest = max(widest, len(self.sequence(p, False)))
                    if (j - i + 1) * 2 * widest > self.build_tokens and j > i:
                        break
                    j += 1
                batch = missing[i:j]
                for key, states in zip(batch, self._trunk([keys[k] for k in batch]), strict=True):
                    out.add(key, *states)
                # the index is rewritten whole on each commit: every few seconds, not every batch, or a large
                # build spends quadratic time on it; a crash loses at most these seconds of work
                if j == len(missing) or time.monotonic() - committed > COMMIT_SECONDS:
                    out.commit()
                    committed = time.monotonic()
                bar.update(len(batch))
                i = j
            bar.close()
        self.stats["built"] += len(missing)
        return len(missing)

    @torch.no_grad()
    def _trunk(self, pairs: list[EncodedPair]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Hidden states entering block ``start``: (prefix, suffix (a, b), suffix (b, a)) per pair.

        The (a, b) sequences run whole; the (b, a) suffixes then run on the keys and values of the prefix
        they share, left in the cache by the first pass. Prefix and two suffixes as three padded pieces would
        pad twice and cost about what sharing saves (BENCHMARKS.md).
        """
        if not self.share_prefix:
            return self._trunk_whole(pairs)
        model = self.model
        device = next(model.parameters()).device
        p0, p1, p2, p3 = self.pieces
        prefixes = [p0 + p.prompt + p1 for p in pairs]
        firsts = [pre + p.a + p2 + p.b + p3 for pre, p in zip(prefixes, pairs, strict=True)]
        seconds = [p.b + p2 + p.a + p3 for p in pairs]
        ids, mask = self.pad(firsts, device)
        suf_ids, suf_mask = self.pad(seconds, device)
        pre_len = torch.tensor([len(p) for p in prefixes], device=device)
        width = int(pre_len.max())  # the suffixes need only the prefixes' keys: the rest is cropped below
        prefix_only = (torch.arange(width, device=device)[None] < pre_len[:, None]).long()
        with self._frozen_trunk() as dec:
            # plain layers: a sliding-window layer type would trim or refuse the crop below (the window is at
            # least max_length here, so it never cuts)
            out = dec(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(), use_cache=True)
            out.past_key_values.crop(width - ids.shape[1])
            second = dec(
                input_ids=suf_ids,
                attention_mask=torch.cat([prefix_only, suf_mask], dim=1),
                position_ids=pre_len[:, None] + torch.arange(suf_ids.shape[1], device=device),
                past_key_values=out.past_key_values,
                use_cache=True,
            ).last_hidden_state
        first = out.last_hidden_state
        result = []
        for i, (pre, seq) in enumerate(zip(prefixes, firsts, strict=True)):
            s = len(seq) - len(pre)
            result.append((first[i, : len(pre)], first[i, len(pre) : len(seq)], second[i, :s]))
        return result

    @contextmanager
    def _frozen_trunk(self):
        """The decoder's blocks below ``start``, base weights only (adapters off), in eval mode."""
        was_training = self.model.training
        self.model.eval()
        try:
            with _adapters_off(self.model), decoder_slice(self.model, 0, self.start, final_norm=False) as dec:
                yield dec
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def _trunk_whole(self, pairs: list[EncodedPair]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``_trunk`` with both orders as whole sequences (models with a short sliding window)."""
        ids, mask, _ = self.batch(pairs, both_orders=True, device=next(self.model.parameters()).device)
        with self._frozen_trunk() as dec:
            h = dec(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        result, n = [], len(pairs)
        for i, p in enumerate(pairs):
            pre = len(self.pieces[0]) + len(p.prompt) + len(self.pieces[1])
            end = self.length(p)
            result.append((h[i, :pre], h[i, pre:end], h[n + i, pre:end]))
        return result

    def _check_split(self) -> None:
        """The cached path must give the model's own answer logits on a short pair, or this model is refused."""
        pair = EncodedPair(self.pieces[0][-3:] * 2, self.pieces[1][:4], self.pieces[2][:3], 1.0, "probe")
        device = next(self.model.parameters()).device
        rows = (self.pieces[1][0], self.pieces[2][-1])  # any two rows of the output layer will do
        with torch.no_grad(), _adapters_off(self.model):
            full, _ = PairEncoder.logits(self, self.model, [pair], True, rows, device)
            try:
                split = self._top_logits(self.model, self._trunk([pair]), True, rows, device)
            except Exception as exc:  # a decoder whose blocks cannot run apart
                raise TrunkUnsupportedError(
                    f"selector.path=cached: {type(_base(self.model)).__name__} cannot run split at block "
                    f"{self.start} ({type(exc).__name__}: {exc}); use selector.path=full for this model"
                ) from exc
        err = float((split - full).norm() / full.norm().clamp_min(1e-12))
        tol = 1e-4 if next(self.model.parameters()).dtype == torch.float32 else 3e-2
        if not err <= tol:
            raise TrunkUnsupportedError(
                f"selector.path=cached: splitting {type(_base(self.model)).__name__} at block {self.start} "
                f"changes its answer logits (relative error {err:.2e}); use selector.path=full for this model"
            )

    # ------------------------------------------------------------------------------------------ using
    def logits(self, model, pairs, both_orders, choice_ids, device=None):
        keys = [pair_key(p) for p in pairs]
        missing = [p for p, k in zip(pairs, keys, strict=True) if k not in self.store]
        if missing:  # pairs made by the base class's encode (or another encoder): build them now
            self.prepare(missing)
        states = [self.store.get(k) for k in keys]
        targets = [p.label for p in pairs] + ([1.0 - p.label for p in pairs] if both_orders else [])
        target = torch.tensor(targets, dtype=torch.float32, device=device)
        return self._top_logits(model, states, both_orders, choice_ids, device), target

    def _top_logits(self, model, states, both_orders: bool, choice_ids, device) -> torch.Tensor:
        """[R, 2] answer logits from trunk states, rows as ``PairEncoder.batch`` orders them.

        The (a, b) rows run whole; the (b, a) rows then run only their suffix, on the keys and values of the
        prefix the (a, b) rows left in the cache (gradients flow through them), so a pair's prefix goes
        through the top blocks once, not twice. (Prefix and suffixes as three padded pieces would pad twice and
        cost more than they save.) In the last block only the answer position's output is read, so its MLP,
        most of a block's work, runs there alone. Both are exact: ``_check_split`` and the tests compare with
        the full forward.
        """
        if not self.share_prefix:  # both orders whole
            rows = [torch.cat([pre, ab]) for pre, ab, _ in states]
            rows += [torch.cat([pre, ba]) for pre, _, ba in states] if both_orders else []
            hidden, mask = _stack(rows, device)
            last = mask.sum(1) - 1
            top = decoder_slice(model, self.start, self.num_layers, final_norm=False)
            with top as dec, _mlp_only_at(dec.layers[-1], _flat_index(last, hidden.shape[1])):
                h = dec(inputs_embeds=hidden, attention_mask=mask, use_cache=False).last_hidden_state
            return _answers(model, h[torch.arange(h.shape[0], device=h.device), last], choice_ids)
        first, first_mask = _stack([torch.cat([pre, ab]) for pre, ab, _ in states], device)
        last = first_mask.sum(1) - 1
        with decoder_slice(model, self.start, self.num_layers, final_norm=False) as dec:
            cache = _TopBlocksCache(self.start) if both_orders else None
            with _mlp_only_at(dec.layers[-1], _flat_index(last, first.shape[1])):
                h = dec(
                    inputs_embeds=first,
                    attention_mask=first_mask,
                    past_key_values=cache,
                    use_cache=both_orders,
                )
            rows = [h.last_hidden_state[torch.arange(len(states), device=h.last_hidden_state.device), last]]
            if both_orders:
                suf, suf_mask = _stack([ba for _, _, ba in states], device)
                pre_len = torch.tensor([pre.shape[0] for pre, _, _ in states], device=suf.device)
                width = int(pre_len.max())  # the suffix needs only the prefix's keys: drop the rest
                cache.crop(width - first.shape[1])
                prefix_only = (torch.arange(width, device=suf.device)[None] < pre_len[:, None]).long()
                suf_last = suf_mask.sum(1) - 1
                with _mlp_only_at(dec.layers[-1], _flat_index(suf_last, suf.shape[1])):
                    h = dec(
                        inputs_embeds=suf,
                        attention_mask=torch.cat([prefix_only, suf_mask], dim=1),
                        position_ids=pre_len[:, None] + torch.arange(suf.shape[1], device=suf.device),
                        past_key_values=cache,
                        use_cache=True,
                    )
                rows.append(h.last_hidden_state[torch.arange(len(states), device=suf.device), suf_last])
        return _answers(model, torch.cat(rows), choice_ids)


def _answers(model, h: torch.Tensor, choice_ids) -> torch.Tensor:
    """[R, 2] answer logits from each row's last hidden state [R, d] before the final norm."""
    h = _base(model).get_decoder().norm(h)
    return answer_logits(model, h[:, None], torch.ones((h.shape[0], 1), dtype=torch.long), choice_ids)


def sliding_window(config) -> int | None:
    """The shortest attention window of any layer of this decoder, or None when every layer sees everything."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if not window or getattr(cfg, "use_sliding_window", True) is False:
        return None
    if types is not None and not any("sliding" in t for t in types):
        return None
    return int(window)


def _flat_index(last: torch.Tensor, width: int) -> torch.Tensor:
    return torch.arange(last.shape[0], device=last.device) * width + last


class _TopBlocksCache(DynamicCache):
    """A DynamicCache filled by the top blocks only (layer indices from ``start``).

    The decoder sizes its masks by asking the cache about layer 0 (or the first layer of a type), which the
    top blocks never fill; the first top block answers instead (every layer holds the same positions).
    """

    def __init__(self, start: int):
        super().__init__()  # plain layers, created as the blocks fill them (see _trunk on sliding windows)
        self.start = start

    def _served_by(self, layer_idx: int) -> int:
        return max(layer_idx, self.start)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(self._served_by(layer_idx))

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, self._served_by(layer_idx))


def _stack(rows: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [R, T, d] states and their [R, T] mask."""
    width = padded_width(r.shape[0] for r in rows)
    hidden = torch.zeros((len(rows), width, rows[0].shape[1]), dtype=rows[0].dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        hidden[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = 1
    return hidden.to(device), mask.to(device)


class _AtPositions(nn.Module):
    """A block's MLP computed only at the given flat positions of its [R, T, d] input, zeros elsewhere."""

    def __init__(self, mlp: nn.Module, index: torch.Tensor):
        super().__init__()
        self.mlp, self.index = mlp, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = self.mlp(flat[self.index])
        return flat.new_zeros(flat.shape).index_copy(0, self.index, out).view(x.shape)


@contextmanager
def _mlp_only_at(layer: nn.Module, index: torch.Tensor):
    mlp = getattr(layer, "mlp", None)
    if not isinstance(mlp, nn.Module):  # a block of another shape: run it whole (still exact, only slower)
        yield
        return
    layer.mlp = _AtPositions(mlp, index)
    try:
        yield
    finally:
        layer.mlp = mlp
