import copy

import pytest
import torch

from fedbiscuit.config import GenerationConfig, LoraSettings
from fedbiscuit.models.adapters import add_adapter
from fedbiscuit.models.tiny import scripted_model, tiny_tokenizer
from fedbiscuit.rlhf.baselines import HumanPair
from fedbiscuit.rlhf.dpo import encode_preferences
from fedbiscuit.rlhf.generation import (
    cache_key,
    dialogue_messages,
    encode_prompts,
    sample,
    stop_token_ids,
    weights_fingerprint,
)


def test_hh_transcripts_become_chat_messages():
    prompt = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\nAssistant:"
    assert dialogue_messages(prompt) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke"},
    ]
    assert dialogue_messages("Summarise this post") == [{"role": "user", "content": "Summarise this post"}]


def test_samples_n_per_prompt_and_serves_the_second_call_from_the_cache(tiny, tmp_path):
    model, tok = tiny
    cfg = GenerationConfig(num_candidates=3, max_new_tokens=6, batch_size=2, chat_template=False)
    prompts = ["hello", "a longer prompt here", "x"]
    first = sample(model, tok, prompts, cfg, seed=1, cache_dir=tmp_path)
    assert len(first.texts) == 3 and all(len(t) == 3 for t in first.texts)
    assert all(0 <= n <= 6 for row in first.new_tokens for n in row)
    assert not first.from_cache and len(list(tmp_path.glob("*.json"))) == 1
    again = sample(model, tok, prompts, cfg, seed=1, cache_dir=tmp_path)
    assert again.from_cache and again.texts == first.texts
    # a fresh generation with the same seed reproduces the cached samples
    fresh = sample(model, tok, prompts, cfg, seed=1, cache_dir=None)
    assert fresh.texts == first.texts


def test_cache_key_follows_the_weights_not_the_name(tiny):
    model, tok = tiny
    model = add_adapter(model, "policy", LoraSettings(r=4, alpha=8, dropout=0.0))
    cfg = GenerationConfig()
    base_fp = weights_fingerprint(model, None)
    policy_fp = weights_fingerprint(model, "policy")
    assert base_fp != policy_fp  # the adapter's tensors are part of what generates
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.01)
    assert weights_fingerprint(model, "policy") != policy_fp  # retrained adapter, same name: new key
    assert weights_fingerprint(model, None) == base_fp  # the base did not change
    # other adapters wrap other layers (peft renames their weights) but leave the base as it is: same key
    other = add_adapter(
        copy.deepcopy(model),
        "selector-0",
        LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["k_proj", "o_proj"]),
    )
    assert any(".k_proj.base_layer." in n for n, _ in other.named_parameters())
    assert weights_fingerprint(other, None) == base_fp
    assert weights_fingerprint(other, "policy") == weights_fingerprint(model, "policy")
    k = cache_key(base_fp, ["a"], cfg, 0, 2)
    assert k != cache_key(base_fp, ["b"], cfg, 0, 2)
    assert k != cache_key(base_fp, ["a"], cfg.model_copy(update={"temperature": 0.3}), 0, 2)
    assert k != cache_key(base_fp, ["a"], cfg, 1, 2)
    assert k == cache_key(base_fp, ["a"], cfg, 0, 2)


def test_adapter_none_generates_from_the_base(tiny):
    model, tok = tiny
    cfg = GenerationConfig(num_candidates=2, max_new_tokens=5, chat_template=False)
    base = sample(model, tok, ["hello"], cfg, seed=3)
    model = add_adapter(model, "policy", LoraSettings(r=4, alpha=8, dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 1.0)
    off = sample(model, tok, ["hello"], cfg, seed=3, adapter=None)
    on = sample(model, tok, ["hello"], cfg, seed=3, adapter="policy")
    assert off.texts == base.texts
    assert on.texts != base.texts


def test_an_unknown_adapter_is_an_error_not_the_base_models_samples(tiny, tmp_path):
    import pytest

    model, tok = tiny
    model = add_adapter(model, "policy", LoraSettings(r=4, alpha=8, dropout=0.0))
    cfg = GenerationConfig(num_candidates=2, max_new_tokens=4, chat_template=False)
    sample(model, tok, ["hello"], cfg, cache_dir=tmp_path)  # base samples in the cache
    with pytest.raises(ValueError, match="polcy"):
        sample(model, tok, ["hello"], cfg, adapter="polcy", cache_dir=tmp_path)


def test_finished_flags_follow_eos(tiny, monkeypatch):
    """Scripted continuations: a sample that emitted EOS is finished (and loses the EOS and any padding after
    it), one that ran to max_new_tokens is not, whatever its length."""
    model, tok = tiny
    eos, pad = tok.eos_token_id, tok.pad_token_id
    a, b, c = tok.convert_tokens_to_ids(["#", "$", "%"])
    continuations = torch.tensor(
        [
            [a, eos, pad],  # prompt 0, sample 0: one token, then EOS
            [a, b, c],  # prompt 0, sample 1: cut at the limit
            [eos, pad, pad],  # prompt 1, sample 0: EOS at once, an empty answer
            [c, b, eos],  # prompt 1, sample 1: EOS as the last token allowed
        ]
    )

    def generate(input_ids, num_return_sequences, **kw):
        return torch.cat([input_ids.repeat_interleave(num_return_sequences, 0), continuations], 1)

    monkeypatch.setattr(model, "generate", generate)
    cfg = GenerationConfig(num_candidates=2, max_new_tokens=3, chat_template=False)
    out = sample(model, tok, ["a", "bb"], cfg, seed=0)
    assert out.finished == [[True, False], [True, True]]
    assert out.new_tokens == [[1, 3], [0, 2]]
    assert out.texts == [["#", "#$%"], ["", "%$"]]
    # the sampled ids, up to and including the stop token (what DPO scores)
    assert out.tokens == [[[a, eos], [a, b, c]], [[eos], [c, b, eos]]]


def _greedy_by_hand(model, ids: list[int], steps: int, eos: int) -> list[int]:
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
    return out


def test_an_empty_prompt_is_answered_after_the_start_token_as_dpo_scores_it(tiny):
    from fedbiscuit.rlhf.baselines import HumanPair
    from fedbiscuit.rlhf.dpo import encode_preferences

    model, tok = tiny
    cfg = GenerationConfig(num_candidates=2, max_new_tokens=5, batch_size=2, chat_template=False)
    (pref,) = encode_preferences(tok, [HumanPair("", "yes", "no")], cfg)
    assert pref.prompt == [tok.bos_token_id]  # DPO's context for an empty prompt
    # generation answers after that same context, alone and beside a longer prompt (left padding)
    expected = _greedy_by_hand(model, pref.prompt, 5, tok.eos_token_id)
    for prompts in ([""], ["", "a much longer prompt here"]):
        out = sample(model, tok, prompts, cfg, n=1, greedy=True)
        assert out.new_tokens[0] == [len(expected)]
        assert out.texts[0] == [tok.decode(expected, skip_special_tokens=True).strip()]


@pytest.mark.parametrize("tokenizer_eos", ["<|im_end|>", "<|endoftext|>"])
def test_a_chat_model_stops_at_its_end_of_turn_token(smollm2_tokenizer, tokenizer_eos):
    """The real SmolLM2 chat tokenizer and a model scripted to answer "Hi there<|im_end|>" and then, if not
    stopped, invent the next turn. SmolLM2-Instruct's tokenizer names <|im_end|> as its EOS; many chat
    checkpoints (Qwen2.5, Llama 3, SmolLM2 base tuned to chat) keep the document end <|endoftext|> there and
    name the end of turn only in the model's generation config, which generation must follow."""
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.eos_token = tokenizer_eos
    im_start, im_end, endoftext = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    (nl,) = tok("\n").input_ids
    hi, there = tok("Hi there").input_ids
    (user,) = tok("user").input_ids
    script = {nl: hi, hi: there, there: im_end, im_end: im_start, im_start: user, user: nl}
    model = scripted_model(len(tok), script, eos_token_id=[im_end, endoftext])
    cfg = GenerationConfig(num_candidates=2, max_new_tokens=12)  # chat template on
    prompt = "\n\nHuman: Say hi\n\nAssistant:"
    out = sample(model, tok, [prompt], cfg, n=1, greedy=True)
    assert out.texts == [["Hi there"]]  # not "Hi there user\nHi there user\n..." up to the limit
    assert stop_token_ids(model, tok) == [im_end, endoftext]
    assert out.tokens == [[[hi, there, im_end]]]
    assert out.finished == [[True]] and out.new_tokens == [[2]]
    # a complete human reply is taught to end the same way, after the same rendered context
    (pref,) = encode_preferences(
        tok, [HumanPair(prompt, "Hi there", "No")], cfg, stops=stop_token_ids(model, tok)
    )
    assert pref.chosen == [hi, there, im_end] and pref.rejected[-1] == im_end
    assert pref.prompt == encode_prompts(tok, [prompt], cfg)[0]
    assert pref.prompt[-3:] == tok("assistant\n").input_ids and pref.prompt.count(im_start) == 3


def test_a_base_model_stops_at_eos_and_its_prompt_starts_with_bos(monkeypatch):
    """A tokenizer that adds BOS (Llama-style) and no chat template: the policy reads the BOS the model was
    trained with, in generation and in DPO alike, and stops at its EOS."""
    tok = tiny_tokenizer(add_bos=True)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    q, a, b = tok.convert_tokens_to_ids(["?", "#", "$"])
    model = scripted_model(len(tok), {q: a, a: b, b: eos, eos: a}, eos_token_id=eos)
    seen = []
    real = model.generate

    def spy(**kw):
        seen.append(kw["input_ids"].tolist())
        return real(**kw)

    monkeypatch.setattr(model, "generate", spy)
    cfg = GenerationConfig(num_candidates=2, max_new_tokens=8, chat_template=False)
    out = sample(model, tok, ["Is it?"], cfg, n=1, greedy=True)
    expected = [bos] + tok("Is it?", add_special_tokens=False).input_ids
    assert seen == [[expected]]
    assert out.tokens == [[[a, b, eos]]] and out.texts == [["#$"]] and out.finished == [[True]]
    (pref,) = encode_preferences(tok, [HumanPair("Is it?", "#$", "$")], cfg, stops=stop_token_ids(model, tok))
    assert pref.prompt == expected and pref.chosen == [a, b, eos]
    # a long prompt loses its oldest tokens, never the BOS
    (long,) = encode_prompts(tok, ["x " * 100 + "END"], cfg.model_copy(update={"max_prompt_length": 16}))
    assert len(long) == 16 and long[0] == bos and tok.decode(long[1:]).endswith("END")


def test_smollm2_prompts_get_no_extra_bos(smollm2_tokenizer):
    """SmolLM2's tokenizer adds no BOS itself, and its chat template writes the start tokens: nothing added."""
    tok = smollm2_tokenizer
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    plain = GenerationConfig(chat_template=False)
    assert encode_prompts(tok, ["hello there"], plain) == [tok("hello there").input_ids]
    (chat,) = encode_prompts(tok, ["hello there"], GenerationConfig())
    rendered = tok.apply_chat_template(
        dialogue_messages("hello there"), tokenize=False, add_generation_prompt=True
    )
    assert chat == tok(rendered, add_special_tokens=False).input_ids and chat[:2] != [im_start, im_start]


def test_base_weights_are_hashed_once_until_one_changes(tiny, monkeypatch):
    import fedbiscuit.rlhf.generation as generation

    model, _ = tiny
    model = add_adapter(model, "policy", LoraSettings(r=4, alpha=8, dropout=0.0))
    real, sizes = generation._digest, []

    def counting(named):
        named = list(named)
        sizes.append(len(named))
        return real(named)

    monkeypatch.setattr(generation, "_digest", counting)
    first = weights_fingerprint(model, "policy")
    base_count = sum(1 for n, _ in model.named_parameters() if "lora_" not in n)
    assert sizes[0] == base_count  # the base, hashed once
    sizes.clear()
    assert weights_fingerprint(model, "policy") == first
    assert base_count not in sizes  # ... and not again: only the adapter's few tensors
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_" not in n).add_(1.0)  # a base weight, in place
    assert weights_fingerprint(model, "policy") != first
