import torch

from fedbiscuit.config import GenerationConfig, LoraSettings
from fedbiscuit.models.adapters import add_adapter
from fedbiscuit.rlhf.generation import cache_key, dialogue_messages, sample, weights_fingerprint


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
