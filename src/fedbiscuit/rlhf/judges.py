"""Pairwise judges: given prompts and two answers each, P(first answer better) in the order shown.

- SelectorJudge: a selector adapter on a causal LM (one trained on data the policy never saw), or the bare
  model prompted with the comparison template (the "local Hugging Face judge");
- VoteJudge: the K phase-1 selectors' majority vote (what labels the DPO pairs and picks best-of-n);
- OpenAIJudge: any OpenAI-compatible chat endpoint, asked for a single letter, and read strictly: a reply
  that does not give exactly one of the two letters as its verdict is an abstention (0.5), counted.
Callers show both orders themselves (see evaluation.py) so every judge's position bias cancels.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from contextlib import nullcontext
from typing import Protocol

import torch

from ..data.pairs import Comparison
from ..models.adapters import AdapterState, load_adapter_state
from ..selector.training import score_pairs
from .labelling import selector_probs, vote


class JudgeError(RuntimeError):
    pass


class Judge(Protocol):
    name: str

    def prefer(self, prompts: list[str], first: list[str], second: list[str]) -> list[float]: ...


def _comparisons(prompts, first, second) -> list[Comparison]:
    return [
        Comparison(p, a, b, 0.5, "judge", "judge") for p, a, b in zip(prompts, first, second, strict=True)
    ]


class SelectorJudge:
    """A selector (adapter ``state`` loaded into ``slot``) or, with state None, the model with adapters off."""

    def __init__(
        self,
        model,
        encoder,
        choice_ids,
        state: AdapterState | None,
        slot: str | None,
        name: str,
        batch_size: int = 16,
    ):
        self.model, self.encoder, self.choice_ids = model, encoder, choice_ids
        self.state, self.slot, self.name, self.batch_size = state, slot, name, batch_size

    def prefer(self, prompts, first, second) -> list[float]:
        encoded = self.encoder.encode(_comparisons(prompts, first, second))
        if self.state is None:
            ctx = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else nullcontext()
        else:
            load_adapter_state(self.model, self.slot, self.state, where=f"judge {self.name}")
            self.model.set_adapter(self.slot)
            ctx = nullcontext()
        with ctx:
            p, _ = score_pairs(
                self.model, self.encoder, encoded, self.choice_ids, self.batch_size, both_orders=False
            )
        return p.tolist()


class VoteJudge:
    """The selectors' majority vote (swap-averaged per selector): 1.0 / 0.0 for a decided pair, 0.5 if not."""

    def __init__(
        self,
        model,
        encoder,
        choice_ids,
        selectors: dict[str, AdapterState],
        slot: str,
        swap_average: bool = True,
        batch_size: int = 16,
        name: str = "selectors",
    ):
        self.model, self.encoder, self.choice_ids = model, encoder, choice_ids
        self.selectors, self.slot, self.swap_average = selectors, slot, swap_average
        self.batch_size, self.name = batch_size, name

    def prefer(self, prompts, first, second) -> list[float]:
        encoded = self.encoder.encode(_comparisons(prompts, first, second))
        probs = selector_probs(
            self.model,
            self.encoder,
            self.choice_ids,
            self.selectors,
            encoded,
            self.slot,
            self.swap_average,
            self.batch_size,
        )
        first_won, decided = vote(probs)
        return torch.where(decided, first_won.float(), torch.tensor(0.5)).tolist()


JUDGE_PROMPT = (
    "You compare two answers to the same request and say which one a careful, honest and helpful assistant "
    "would give.\n\nRequest:\n{prompt}\n\nAnswer A:\n{a}\n\nAnswer B:\n{b}\n\n"
    "Which answer is better? Reply with the single letter A or B."
)


# The verdict letter must open the reply (after markdown, quotes or brackets, and an optional "Answer:") and
# stand alone: followed by the end, a line break or punctuation ("B", "**A**", "(B) is better", "A. Because",
# "Answer: B"). A letter followed by a space and a word is a sentence ("A tie", "A or B", "A matter of taste"):
# no verdict. So is a reply that names both letters on their own.
_VERDICT = re.compile(r"^[\s*_`\"'(\[]*(?:Answer\s*:?[\s*_`\"'(\[]*)?([AB])(?!\w)(?![ \t]+\w)")
_LETTER = re.compile(r"(?<!\w)([AB])(?!\w)")


def parse_verdict(text: str) -> float | None:
    """1.0 for A, 0.0 for B, None when the reply gives no single, unambiguous verdict (an abstention)."""
    found = _VERDICT.match(text)
    if found is None or len(set(_LETTER.findall(text))) > 1:
        return None
    return 1.0 if found.group(1) == "A" else 0.0


class OpenAIJudge:
    """An OpenAI-compatible /chat/completions endpoint; the verdict is read by parse_verdict, and a reply it
    cannot read is an abstention: scored 0.5 and counted in ``unparsed`` (win_rate reports its own calls')."""

    def __init__(
        self,
        url: str | None,
        model: str | None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 30.0,
        retries: int = 2,
    ):
        url = url or os.environ.get("OPENAI_BASE_URL")
        if not url:
            raise JudgeError(
                "rlhf.judge.kind=openai needs rlhf.judge.url (or $OPENAI_BASE_URL), e.g. http://host:8000/v1"
            )
        if not model:
            raise JudgeError("rlhf.judge.kind=openai needs rlhf.judge.model, the endpoint's model name")
        self.url = url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env, self.timeout_s = model, api_key_env, timeout_s
        self.name = f"openai:{model}"
        self.unparsed, self.retries = 0, retries  # unparsed: abstentions (no single A/B verdict)

    def _ask(self, prompt: str, a: str, b: str) -> float:
        body = json.dumps(
            {
                "model": self.model,
                "temperature": 0,
                "max_tokens": 4,
                "messages": [{"role": "user", "content": JUDGE_PROMPT.format(prompt=prompt, a=a, b=b)}],
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as err:
                if err.code in (429, 500, 502, 503, 504) and attempt < self.retries:
                    time.sleep(2**attempt)  # rate limits and restarts pass; a bad request does not
                    continue
                hint = f" (is ${self.api_key_env} set?)" if err.code in (401, 403) else ""
                detail = err.read()[:300].decode("utf-8", "replace").strip()
                raise JudgeError(
                    f"judge endpoint {self.url} answered HTTP {err.code}{hint}"
                    + (f": {detail}" if detail else "")
                ) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                if attempt < self.retries:
                    time.sleep(2**attempt)
                    continue
                reason = getattr(err, "reason", err)
                raise JudgeError(
                    f"cannot reach the judge endpoint {self.url} ({reason}; timeout {self.timeout_s} s, "
                    f"{self.retries + 1} attempts): check rlhf.judge.url / $OPENAI_BASE_URL, or use "
                    "rlhf.judge.kind=selector"
                ) from None
        try:
            reply = json.loads(raw)
        except ValueError:
            raise JudgeError(f"judge endpoint {self.url} did not answer JSON: {raw[:200]!r}") from None
        try:
            text = reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"judge endpoint {self.url} returned no choices[0].message.content") from None
        verdict = parse_verdict(text)
        if verdict is None:
            self.unparsed += 1
            return 0.5
        return verdict

    def prefer(self, prompts, first, second) -> list[float]:
        return [self._ask(p, a, b) for p, a, b in zip(prompts, first, second, strict=True)]
