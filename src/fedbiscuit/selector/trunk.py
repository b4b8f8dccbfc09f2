"""The cached selector path: the frozen blocks run once per pair, only the top blocks run per step.

With LoRA in the last N decoder blocks only (``model.lora.top_layers``), everything below block L-N is the
frozen base model: its output for a given sequence never changes. A client computes it once per pair, keeps
it on its own disk, and from then on training, held-out scoring, evaluation and labelling run only the top N
blocks, the final norm and the two answer rows of the output layer.

The two presentation orders share every token before the first response (template head, prompt, "Reply A:"),
so that prefix runs once, its keys and values are reused for both suffixes, and it is stored once: a pair
costs (prefix + 2 suffixes) positions, not 2 x (prefix + suffix).

The store is content-addressed: a folder per (frozen weights, template, truncation, split point, dtype), an
entry per pair keyed by a hash of its token ids after truncation. It serves every later run on the same data,
centralized or federated, any seed. One append-only data file, read memory-mapped, and a JSON index written
atomically; a crash mid-build loses at most the entries after the last index write, and the next build
resumes. States never leave the client: nothing here is part of a reply.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..durable import durable_write_text
from .encoding import EncodedPair, PairEncoder, padded_width
from .prompts import Template
from .scoring import _base, answer_logits

FORMAT = 1
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
            missing.sort(key=lambda k: (len(keys[k].prompt), len(keys[k].a) + len(keys[k].b)))
            bar = tqdm(
                total=len(missing), desc="cache frozen blocks", unit="pair", disable=self.quiet, leave=False
            )
            i = 0
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
                out.commit()
                bar.update(len(batch))
                i = j
            bar.close()
        self.stats["built"] += len(missing)
        return len(missing)

    @torch.no_grad()
    def _trunk(self, pairs: list[EncodedPair]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Hidden states entering block ``start``: the shared prefix once, then both suffixes on its cache."""
        model = self.model
        device = next(model.parameters()).device
        p0, p1, p2, p3 = self.pieces
        prefixes = [p0 + p.prompt + p1 for p in pairs]
        suffixes = []
        for p in pairs:
            suffixes += [p.a + p2 + p.b + p3, p.b + p2 + p.a + p3]
        pre_ids, pre_mask = self.pad(prefixes, device)
        suf_ids, suf_mask = self.pad(suffixes, device)
        pre_len = pre_mask.sum(1)
        was_training = model.training
        model.eval()
        try:
            with _adapters_off(model), decoder_slice(model, 0, self.start, final_norm=False) as dec:
                out = dec(input_ids=pre_ids, attention_mask=pre_mask, use_cache=True)
                cache = out.past_key_values
                cache.batch_repeat_interleave(2)  # rows: pair 0 (a, b), pair 0 (b, a), pair 1 (a, b), ...
                # the suffix continues each prefix right after its last real token; prefix padding is masked
                mask = torch.cat([pre_mask.repeat_interleave(2, 0), suf_mask], dim=1)
                positions = pre_len.repeat_interleave(2)[:, None] + torch.arange(
                    suf_ids.shape[1], device=device
                )
                suf = dec(
                    input_ids=suf_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                ).last_hidden_state
        finally:
            model.train(was_training)
        pre = out.last_hidden_state
        result = []
        for i in range(len(pairs)):
            s = len(suffixes[2 * i])
            result.append((pre[i, : len(prefixes[i])], suf[2 * i, :s], suf[2 * i + 1, :s]))
        return result

    def _check_split(self) -> None:
        """The split forward must equal the model's own on a short sequence, or this model is not supported."""
        pair = EncodedPair(self.pieces[0][-3:] * 2, self.pieces[1][:4], self.pieces[2][:3], 1.0, "probe")
        ids, mask, _ = self.batch([pair], both_orders=True, device=next(self.model.parameters()).device)
        with torch.no_grad(), _adapters_off(self.model):
            full = _base(self.model).get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            states = self._trunk([pair])
            hidden, hmask = self._assemble([pair], states, both_orders=True, device=ids.device)
            with decoder_slice(self.model, self.start, self.num_layers, final_norm=True) as dec:
                split = dec(inputs_embeds=hidden, attention_mask=hmask).last_hidden_state
        n = int(mask[0].sum())
        err = float((split[0, :n] - full[0, :n]).float().norm() / full[0, :n].float().norm().clamp_min(1e-12))
        tol = 1e-4 if full.dtype == torch.float32 else 3e-2
        if not err <= tol:
            raise TrunkUnsupportedError(
                f"selector.path=cached: splitting {type(_base(self.model)).__name__} at block {self.start} "
                f"changes its output (relative error {err:.2e}); use selector.path=full for this model"
            )

    # ------------------------------------------------------------------------------------------ using
    def _assemble(self, pairs, states, both_orders: bool, device):
        rows = [torch.cat([pre, ab]) for pre, ab, _ in states]
        if both_orders:
            rows += [torch.cat([pre, ba]) for pre, _, ba in states]
        width = padded_width(r.shape[0] for r in rows)
        hidden = torch.zeros((len(rows), width, rows[0].shape[1]), dtype=rows[0].dtype)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            hidden[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = 1
        return hidden.to(device), mask.to(device)

    def hidden_batch(self, pairs: list[EncodedPair], both_orders: bool, device=None):
        """(trunk states [R, T, d], attention_mask, target): ``batch`` with states in place of token ids."""
        keys = [pair_key(p) for p in pairs]
        missing = [p for p, k in zip(pairs, keys, strict=True) if k not in self.store]
        if missing:  # pairs made by the base class's encode (or another encoder): build them now
            self.prepare(missing)
        states = [self.store.get(k) for k in keys]
        hidden, mask = self._assemble(pairs, states, both_orders, device)
        targets = [p.label for p in pairs] + ([1.0 - p.label for p in pairs] if both_orders else [])
        return hidden, mask, torch.tensor(targets, dtype=torch.float32, device=device)

    def logits(self, model, pairs, both_orders, choice_ids, device=None):
        hidden, mask, target = self.hidden_batch(pairs, both_orders, device)
        with decoder_slice(model, self.start, self.num_layers, final_norm=True) as dec:
            h = dec(inputs_embeds=hidden, attention_mask=mask, use_cache=False).last_hidden_state
        return answer_logits(model, h, mask, choice_ids), target
