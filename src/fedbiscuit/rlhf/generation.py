"""The policy samples candidate answers; results are cached on disk under what produced them.

The cache key is made from the weights themselves (a hash of every parameter the generation uses: the base
model and the active adapter, if any), the prompts and the sampling parameters, so a retrained adapter or a
different base model can never be served a stale file that merely shares a name.
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

from ..config import GenerationConfig
from ..runs import atomic_write_text

_TURNS = re.compile(r"\n\n(Human|Assistant):\s?")


@dataclass
class Candidates:
    prompts: list[str]
    texts: list[list[str]]  # texts[i][j]: candidate j for prompt i
    new_tokens: list[list[int]]  # tokens generated for each candidate (length tracking)
    key: str = ""
    from_cache: bool = False
    finished: list[list[bool]] | None = None  # ended with EOS (not cut at max_new_tokens)

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


def prompt_ids(tokenizer, ids: list[int], max_length: int) -> list[int]:
    """The context the policy answers after: the prompt's latest ``max_length`` tokens, or for an empty prompt
    the start token (BOS, else EOS). Generation and DPO both use this, so the reply DPO scores is scored after
    the same context it was sampled from (an all-padding row would leave generation nothing to attend to)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return ids[-max_length:] or [start]


def weights_fingerprint(model, adapter: str | None) -> str:
    """A hash of every tensor generation uses: the base weights and, if given, that adapter's LoRA weights."""
    h = hashlib.blake2b(digest_size=16)
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if "lora_" in name and (adapter is None or f".{adapter}." not in name + "."):
            continue  # other adapters do not take part
        h.update(name.encode())
        h.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(fingerprint: str, prompts: list[str], cfg: GenerationConfig, seed: int, n: int) -> str:
    payload = json.dumps(
        {
            "weights": fingerprint,
            "prompts": prompts,
            "sampling": cfg.model_dump(mode="json"),
            "seed": seed,
            "n": n,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


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
    key = ""
    if cache_dir is not None:
        fp = weights_fingerprint(model, adapter)
        key = cache_key(fp, prompts, cfg, seed, n) + ("-greedy" if greedy else "")
        path = Path(cache_dir) / f"{key}.json"
        if path.is_file():
            data = json.loads(path.read_text())
            return Candidates(
                data["prompts"], data["texts"], data["new_tokens"], key, True, data.get("finished")
            )

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts, lengths, finished = [], [], []
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=quiet, leave=False)
    ctx = model.disable_adapter() if adapter is None and hasattr(model, "disable_adapter") else nullcontext()
    try:
        if adapter is not None:
            model.set_adapter(adapter)
        with ctx:
            for start in range(0, len(prompts), cfg.batch_size):
                chunk = prompts[start : start + cfg.batch_size]
                rendered = [render_prompt(tokenizer, p, cfg.chat_template) for p in chunk]
                ids = tokenizer(rendered, add_special_tokens=False).input_ids
                ids = [prompt_ids(tokenizer, x, cfg.max_prompt_length) for x in ids]
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
                    eos_token_id=tokenizer.eos_token_id,
                )
                new = out[:, width:].cpu()
                for i in range(len(chunk)):
                    row, row_len, row_done = [], [], []
                    for j in range(n):
                        toks = new[i * n + j].tolist()
                        done = tokenizer.eos_token_id in toks
                        if done:
                            toks = toks[: toks.index(tokenizer.eos_token_id)]
                        while toks and toks[-1] == pad_id:
                            toks.pop()
                        row.append(tokenizer.decode(toks, skip_special_tokens=True).strip())
                        row_len.append(len(toks))
                        row_done.append(done)
                    texts.append(row)
                    lengths.append(row_len)
                    finished.append(row_done)
                bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    result = Candidates(list(prompts), texts, lengths, key, False, finished)
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        payload = {"prompts": result.prompts, "texts": texts, "new_tokens": lengths, "finished": finished}
        atomic_write_text(Path(cache_dir) / f"{key}.json", json.dumps(payload))
    return result
