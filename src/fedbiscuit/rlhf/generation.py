"""The policy samples candidate answers; results are cached on disk under what produced them.

The cache key is made from the weights themselves (a hash of every parameter the generation uses: the base
model and the active adapter, if any), the prompts, the sampling parameters and the stop tokens, so a retrained
adapter or a different base model can never be served a stale file that merely shares a name.

A reply ends at any of the model's own stop tokens (its generation config's eos_token_id, often a list on chat
models: <|im_end|>, <|eot_id|>, <end_of_turn>), not only at the tokenizer's EOS. The sampled token ids are kept
beside the decoded text: DPO scores exactly those tokens, stop token included.
"""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..config import GenerationConfig
from ..runs import atomic_write_text
from ..selector.encoding import adds_bos

_TURNS = re.compile(r"\n\n(Human|Assistant):\s?")


@dataclass
class Candidates:
    prompts: list[str]
    texts: list[list[str]]  # texts[i][j]: candidate j for prompt i
    new_tokens: list[list[int]]  # each candidate's length in tokens, without its stop token
    key: str = ""
    from_cache: bool = False
    finished: list[list[bool]] | None = None  # ended with a stop token (not cut at max_new_tokens)
    # tokens[i][j]: the ids sampled for candidate j of prompt i, ending with the stop token when finished
    tokens: list[list[list[int]]] | None = None

    def is_finished(self, i: int, j: int) -> bool:
        return True if self.finished is None else self.finished[i][j]

    def mean_length(self) -> float:
        lengths = [n for row in self.new_tokens for n in row]
        return sum(lengths) / len(lengths) if lengths else 0.0


def dialogue_messages(prompt: str) -> list[dict]:
    """An HH-style transcript ('\\n\\nHuman: ...\\n\\nAssistant:') as chat messages; other text is one user turn."""
    parts = _TURNS.split(prompt if prompt.startswith("\n\n") else "\n\n" + prompt)
    if len(parts) < 3:
        return [{"role": "user", "content": prompt.strip()}]
    messages = []
    for speaker, text in zip(parts[1::2], parts[2::2], strict=True):
        text = text.strip()
        if text:
            messages.append({"role": "user" if speaker == "Human" else "assistant", "content": text})
    # the transcript's final, empty 'Assistant:' turn is what we generate (add_generation_prompt)
    return messages or [{"role": "user", "content": prompt.strip()}]


def render_prompt(tokenizer, prompt: str, chat_template: bool) -> str:
    if chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            dialogue_messages(prompt), tokenize=False, add_generation_prompt=True
        )
    return prompt


def prompt_ids(tokenizer, ids: list[int], max_length: int, head: list[int] | None = None) -> list[int]:
    """The context the policy answers after: ``head`` (the BOS a plain prompt starts with, if any) and the
    prompt's latest tokens, ``max_length`` in all; for an empty prompt the start token (BOS, else EOS). An
    all-padding row would leave generation nothing to attend to."""
    head = head or []
    kept = head + ids[max(0, len(ids) - (max_length - len(head))) :]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return kept or [start]


def encode_prompts(tokenizer, prompts: list[str], cfg: GenerationConfig) -> list[list[int]]:
    """Prompts as the policy sees them, as token ids. Generation and DPO both use this, so a reply is scored
    after the very context it was sampled from.

    A chat template writes its own start tokens, so its text is tokenised as it is; a plain prompt gets the
    BOS the tokenizer itself would add (Llama-style tokenizers do, SmolLM2's does not), as the selector's
    encoder does: a model trained with BOS first reads a prompt without it as out of distribution."""
    templated = bool(cfg.chat_template and getattr(tokenizer, "chat_template", None))
    ids = tokenizer(
        [render_prompt(tokenizer, p, cfg.chat_template) for p in prompts], add_special_tokens=False
    )
    head = [tokenizer.bos_token_id] if not templated and adds_bos(tokenizer) else []
    return [prompt_ids(tokenizer, x, cfg.max_prompt_length, head) for x in ids.input_ids]


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end a reply: the model's generation config's eos_token_id (an id or a list; chat models
    end a turn with <|im_end|>, <|eot_id|>, <end_of_turn>, which the tokenizer's EOS often is not), then the
    tokenizer's EOS. generate() would otherwise run past the end of the turn and invent the next ones."""
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    ids.append(tokenizer.eos_token_id)
    out = list(dict.fromkeys(int(i) for i in ids if i is not None))
    if not out:
        raise ValueError(
            "neither the model's generation_config.eos_token_id nor the tokenizer's eos_token is set"
        )
    return out


_SENTINEL = "FEDBISCUIT_REPLY_END_PROBE"


def reply_end_id(tokenizer, chat_template: bool, stops: list[int] | None = None) -> int | None:
    """The token a complete reply given as text (a human-written answer) ends with, so DPO and SFT teach the
    stop token the policy really emits: with a chat template, the first of ``stops`` that the template writes
    right after an assistant message (<|im_end|>, <|eot_id|>, <end_of_turn>); otherwise the first of
    ``stops`` (from stop_token_ids; default: the tokenizer's EOS)."""
    stops = stops or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # noqa: BLE001 (a template may refuse this conversation: fall back to the stops)
            text = ""
        if _SENTINEL in text:
            tail = tokenizer(text.split(_SENTINEL, 1)[1], add_special_tokens=False).input_ids
            found = [t for t in tail if t in stops]
            if found:
                return found[0]
    return stops[0] if stops else None


def _digest(named) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, param in named:
        h.update(name.encode())
        h.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _unwrapped(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def weights_fingerprint(model, adapter: str | None) -> str:
    """A hash of every tensor generation uses: the base weights and, if given, that adapter's LoRA weights.

    The base weights are hashed once per model and their hash reused while no base tensor has been replaced or
    written in place (each tensor's storage pointer and version counter say so): hashing them means copying
    every weight to the CPU, gigabytes for a 2B model, on every sampling call otherwise."""
    params = sorted(model.named_parameters(), key=lambda kv: kv[0])
    # a base tensor by the name it has without adapters: peft renames a wrapped layer's weight to
    # ".base_layer.weight", and which layers are wrapped depends on the adapters loaded (a selectors run holds
    # the selectors' and the policy's, a FedDPO run the policy's only), which do not change what the base generates
    base = [(_unwrapped(n), p) for n, p in params if "lora_" not in n]
    lora = [(n, p) for n, p in params if "lora_" in n and adapter is not None and f".{adapter}." in n + "."]
    state = tuple((n, p.data_ptr(), p._version, tuple(p.shape), p.dtype, p.device) for n, p in base)
    cached = model.__dict__.get("_fedbiscuit_base_fingerprint")
    if cached is None or cached[0] != state:
        cached = (state, _digest(base))
        model.__dict__["_fedbiscuit_base_fingerprint"] = cached
    return hashlib.blake2b((cached[1] + _digest(lora)).encode(), digest_size=16).hexdigest()


def cache_key(
    fingerprint: str,
    prompts: list[str],
    cfg: GenerationConfig,
    seed: int,
    n: int,
    stops: list[int] | None = None,
) -> str:
    payload = json.dumps(
        {
            "weights": fingerprint,
            "prompts": prompts,
            "sampling": cfg.model_dump(mode="json"),
            "seed": seed,
            "n": n,
            "stops": list(stops or []),
            "format": 2,  # 2: the files keep the sampled token ids
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def cut_at_stop(ids: list[int], stops: list[int]) -> tuple[list[int], int, bool]:
    """(the sampled ids up to and including the first stop token, the reply's length without it, finished).

    Everything after a stop token is padding. A row without one ran to max_new_tokens and every id in it was
    sampled, so none is dropped (not even one equal to the padding id)."""
    stop = next((k for k, t in enumerate(ids) if t in stops), None)
    if stop is None:
        return ids, len(ids), False
    return ids[: stop + 1], stop, True


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: list[str],
    cfg: GenerationConfig,
    *,
    n: int | None = None,
    adapter: str | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    greedy: bool = False,
    quiet: bool = True,
    desc: str = "generate",
) -> Candidates:
    """``n`` (default cfg.num_candidates) sampled answers per prompt from ``adapter`` (None: adapters disabled)."""
    n = n or cfg.num_candidates
    if adapter is not None and adapter not in getattr(model, "peft_config", {}):
        raise ValueError(f"the model has no adapter named {adapter!r}")
    if greedy and n != 1:
        raise ValueError("greedy decoding gives one answer per prompt: use n=1")
    stops = stop_token_ids(model, tokenizer)
    key = ""
    if cache_dir is not None:
        fp = weights_fingerprint(model, adapter)
        key = cache_key(fp, prompts, cfg, seed, n, stops) + ("-greedy" if greedy else "")
        path = Path(cache_dir) / f"{key}.json"
        if path.is_file():
            data = json.loads(path.read_text())
            return Candidates(
                data["prompts"],
                data["texts"],
                data["new_tokens"],
                key,
                True,
                data["finished"],
                data["tokens"],
            )

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts, lengths, finished, tokens = [], [], [], []
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=quiet, leave=False)
    ctx = model.disable_adapter() if adapter is None and hasattr(model, "disable_adapter") else nullcontext()
    try:
        if adapter is not None:
            model.set_adapter(adapter)
        with ctx:
            # Under a launcher each process generates every world-th batch, seeded by the batch's offset as one
            # process would, and the batches are gathered: the same samples, in the same order, on every process.
            rank, world = distributed.world()
            done: dict[int, tuple] = {}
            for start in list(range(0, len(prompts), cfg.batch_size))[rank::world]:
                chunk = prompts[start : start + cfg.batch_size]
                ids = encode_prompts(tokenizer, chunk, cfg)
                width = max(len(x) for x in ids)
                # left padding: every row's answer starts at the same column
                input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(ids), width), dtype=torch.long)
                for i, x in enumerate(ids):
                    input_ids[i, width - len(x) :] = torch.tensor(x)
                    mask[i, width - len(x) :] = 1
                torch.manual_seed(seed * 1_000_003 + start)  # same batches, same samples, on resume or rerun
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=mask.to(device),
                    do_sample=not greedy,
                    temperature=None if greedy else cfg.temperature,
                    top_p=None if greedy else cfg.top_p,
                    top_k=None,
                    max_new_tokens=cfg.max_new_tokens,
                    num_return_sequences=n,
                    pad_token_id=pad_id,
                    eos_token_id=stops,
                )
                new = out[:, width:].cpu()
                part = ([], [], [], [])
                for i in range(len(chunk)):
                    rows = [cut_at_stop(new[i * n + j].tolist(), stops) for j in range(n)]
                    # the text (for selectors and judges) drops the stop token and surrounding whitespace;
                    # the ids keep exactly what was sampled
                    part[0].append(
                        [tokenizer.decode(r[:k], skip_special_tokens=True).strip() for r, k, _ in rows]
                    )
                    part[1].append([k for _, k, _ in rows])
                    part[2].append([stopped for _, _, stopped in rows])
                    part[3].append([r for r, _, _ in rows])
                done[start] = part
                bar.update(len(chunk))
            for share in distributed.all_gather_objects(done):
                done.update(share)
            for start in sorted(done):
                for whole, piece in zip((texts, lengths, finished, tokens), done[start], strict=True):
                    whole.extend(piece)
    finally:
        bar.close()
        model.train(was_training)
    result = Candidates(list(prompts), texts, lengths, key, False, finished, tokens)
    if cache_dir is not None and distributed.is_main():  # every process holds the same result
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        payload = {
            "prompts": result.prompts,
            "texts": texts,
            "new_tokens": lengths,
            "finished": finished,
            "tokens": tokens,
        }
        atomic_write_text(Path(cache_dir) / f"{key}.json", json.dumps(payload))
    return result
