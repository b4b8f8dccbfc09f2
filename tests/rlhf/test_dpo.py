import math

import pytest
import torch

from fedbiscuit.config import DPOConfig, GenerationConfig, LoraSettings
from fedbiscuit.models.adapters import adapter_state, add_adapter
from fedbiscuit.rlhf.baselines import HumanPair
from fedbiscuit.rlhf.dpo import (
    EncodedPreference,
    dpo_loss,
    dpo_steps,
    encode_preferences,
    pair_logps,
    reference_logps,
    response_logps,
    train_dpo,
)
from fedbiscuit.rlhf.labelling import PreferencePair


def test_sigmoid_and_ipo_losses_match_values_computed_by_hand():
    pc, pr = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -4.0])
    rc, rr = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # pair 0: dc = 1, dr = -1 -> -log sigmoid(0.2); pair 1: dc = 0, dr = 1 -> -log sigmoid(-0.1)
    assert loss[0].item() == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-6)
    assert loss[1].item() == pytest.approx(math.log1p(math.exp(0.1)), abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.1, 0.0])
    assert rejected.tolist() == pytest.approx([-0.1, 0.1])
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, kind="ipo")
    assert ipo.tolist() == pytest.approx([(2 - 5) ** 2, (-1 - 5) ** 2])
    with pytest.raises(ValueError, match="hinge"):
        dpo_loss(pc, pr, rc, rr, 0.1, kind="hinge")


def test_response_logps_equal_the_full_model_computation(tiny):
    model, tok = tiny
    prompts = [tok("Q: hello there").input_ids, tok("Q: a much longer question here").input_ids]
    responses = [tok(" yes it is").input_ids, tok(" no").input_ids]
    ours = response_logps(model, prompts, responses, tok.pad_token_id)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids = torch.tensor([p + r])
        logp = model(input_ids=ids).logits.log_softmax(-1)[0]
        expected = sum(logp[len(p) + t - 1, r[t]].item() for t in range(len(r)))
        assert ours[i].item() == pytest.approx(expected, abs=1e-4)


def test_token_logps_in_chunks_equal_one_pass_with_their_gradients(tiny):
    from fedbiscuit.rlhf.dpo import token_logps

    model, _ = tiny
    vocab = model.get_output_embeddings().weight.shape[0]
    h = torch.randn(23, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, vocab, (23,), generator=torch.Generator().manual_seed(1))
    out, grads = [], []
    for elements in (10**9, 5 * vocab):  # one pass; chunks of 5 rows (checkpointed: recomputed in backward)
        x = h.clone().requires_grad_(True)
        logp = token_logps(model, x, targets, chunk_elements=elements)
        (logp * torch.arange(23.0)).sum().backward()
        out.append(logp.detach())
        grads.append(x.grad)
    expected = model.get_output_embeddings()(h).float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], out[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)
    assert grads[0].abs().max() > 0


def _prefs(tok, n=8):
    # chosen answers say "yes", rejected say "no": a policy can learn this in a few steps
    pairs = [HumanPair(f"question {i}?", "yes indeed", "no") for i in range(n)]
    return encode_preferences(tok, pairs, GenerationConfig(chat_template=False, max_new_tokens=8))


def test_reference_is_the_base_with_the_adapter_disabled(tiny):
    model, tok = tiny
    prefs = _prefs(tok, 3)
    with torch.no_grad():
        base = torch.stack(pair_logps(model, prefs, tok.pad_token_id), 1)
    model = add_adapter(model, "policy", LoraSettings(r=4, alpha=8, dropout=0.0))
    for name, p in model.named_parameters():  # make the adapter matter
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    ref = reference_logps(model, prefs, tok.pad_token_id)
    assert torch.allclose(ref, base, atol=1e-5)
    with torch.no_grad():
        active = torch.stack(pair_logps(model, prefs, tok.pad_token_id), 1)
    assert not torch.allclose(active, base, atol=1e-3)  # the adapter was on outside the reference pass


def test_dpo_raises_the_chosen_margin_and_trains_only_the_policy_adapter(tiny):
    model, tok = tiny
    model = add_adapter(model, "selector", LoraSettings(r=4, alpha=8, dropout=0.0), seed=1)
    model = add_adapter(model, "policy", LoraSettings(r=4, alpha=8, dropout=0.0), seed=2)
    selector_before = adapter_state(model, "selector")
    prefs = _prefs(tok)
    ref = reference_logps(model, prefs, tok.pad_token_id)
    cfg = DPOConfig(lr=5e-3, batch_size=4, epochs=10, log_every=5)
    result = train_dpo(model, "policy", prefs, ref, cfg, tok.pad_token_id, seed=0)
    assert result.steps == 20 and len(result.history) == 4
    assert result.history[-1]["loss"] < 0.6 < math.log(2)  # well below the starting ln 2
    assert result.history[-1]["reward_accuracy"] == 1.0
    assert result.history[-1]["reward_margin"] > result.history[0]["reward_margin"]
    for k, v in adapter_state(model, "selector").items():
        assert torch.equal(v, selector_before[k]), k  # the selector adapter is untouched


def test_pairs_won_by_the_first_candidate_are_kept(tiny):
    """The reference implementation drops every pair whose preferred answer came first; we keep them all."""
    model, tok = tiny
    labelled = [
        PreferencePair("p1", "first answer", "second answer", first_won=True, votes=[0.9], unanimous=True),
        PreferencePair("p2", "second answer", "first answer", first_won=False, votes=[0.1], unanimous=True),
        PreferencePair("p3", "alpha", "beta", first_won=True, votes=[0.8], unanimous=True),
    ]
    prefs = encode_preferences(tok, labelled, GenerationConfig(chat_template=False))
    assert len(prefs) == 3
    eos = [tok.eos_token_id]
    assert prefs[0].chosen == tok("first answer", add_special_tokens=False).input_ids + eos
    assert prefs[2].chosen == tok("alpha", add_special_tokens=False).input_ids + eos
    # and all three are trained on: with batch_size 3 and one step, each contributes to the loss
    model = add_adapter(model, "policy", LoraSettings(r=4, alpha=8, dropout=0.0))
    ref = reference_logps(model, prefs, tok.pad_token_id)
    seen = []
    import fedbiscuit.rlhf.dpo as dpo

    real = dpo.pair_logps

    def spy(m, batch, pad):
        seen.extend(id(p) for p in batch)
        return real(m, batch, pad)

    dpo.pair_logps = spy
    try:
        train_dpo(model, "policy", prefs, ref, DPOConfig(batch_size=3), tok.pad_token_id, steps=1)
    finally:
        dpo.pair_logps = real
    assert sorted(seen) == sorted(id(p) for p in prefs)


def test_prompts_keep_their_latest_tokens_and_responses_end_with_eos(tiny):
    _, tok = tiny
    long = HumanPair("x " * 200 + "END", "yes", "no")
    (p,) = encode_preferences(tok, [long], GenerationConfig(chat_template=False, max_prompt_length=16))
    assert isinstance(p, EncodedPreference)
    assert len(p.prompt) == 16 and tok.decode(p.prompt).endswith("END")
    assert p.chosen[-1] == p.rejected[-1] == tok.eos_token_id


def test_eos_only_ends_responses_that_really_ended(tiny):
    _, tok = tiny
    eos = tok.eos_token_id
    gen = GenerationConfig(chat_template=False, max_new_tokens=3)
    long_human = HumanPair("q", "one two three four five six", "no")
    (p,) = encode_preferences(tok, [long_human], gen, max_response_tokens=3)
    assert len(p.chosen) == 3 and eos not in p.chosen  # cut at the limit: no EOS taught there
    assert p.rejected[-1] == eos  # "no" fits: a complete reply ends with EOS
    cut = PreferencePair("q", "ab", "cd", True, [0.9], True, chosen_finished=False, rejected_finished=True)
    (c,) = encode_preferences(tok, [cut], GenerationConfig(chat_template=False))
    assert eos not in c.chosen and c.rejected[-1] == eos


def test_an_empty_prompt_still_gives_every_response_token_a_position(tiny):
    model, tok = tiny
    (p,) = encode_preferences(tok, [HumanPair("", "yes", "no")], GenerationConfig(chat_template=False))
    assert p.prompt == [tok.bos_token_id]
    other = encode_preferences(
        tok, [HumanPair("a much longer prompt here", "x", "y")], GenerationConfig(chat_template=False)
    )
    with torch.no_grad():
        alone = torch.stack(pair_logps(model, [p], tok.pad_token_id))
        batched = torch.stack(pair_logps(model, [p, *other], tok.pad_token_id))[:, :1]
    assert torch.allclose(alone, batched, atol=1e-5)  # padding never leaks into the score


def _spied_dpo(monkeypatch, tiny, texts, cfg, steps, seed=0):
    """Train on ``texts`` pairs; return (result, each micro-batch's pairs as indices, every pair's margin)."""
    import fedbiscuit.rlhf.dpo as dpo

    model, tok = tiny
    prefs = encode_preferences(
        tok, [HumanPair(p, c, r) for p, c, r in texts], GenerationConfig(chat_template=False)
    )
    model = add_adapter(model, "policy", LoraSettings(r=4, alpha=8, dropout=0.0))
    ref = reference_logps(model, prefs, tok.pad_token_id)
    batches, margins = [], []
    real_logps, real_loss = dpo.pair_logps, dpo.dpo_loss

    def logps(m, batch, pad):
        batches.append([next(i for i, p in enumerate(prefs) if p is q) for q in batch])
        return real_logps(m, batch, pad)

    def loss(*args, **kw):
        out = real_loss(*args, **kw)
        margins.extend((out[1] - out[2]).tolist())
        return out

    monkeypatch.setattr(dpo, "pair_logps", logps)
    monkeypatch.setattr(dpo, "dpo_loss", loss)
    result = train_dpo(model, "policy", prefs, ref, cfg, tok.pad_token_id, steps=steps, seed=seed)
    return result, batches, margins


def test_a_batch_never_holds_a_pair_twice_and_epochs_stay_whole(tiny, monkeypatch):
    texts = [("p1", "yes", "no"), ("p2", "good", "bad"), ("p3", "up", "down")]
    cfg = DPOConfig(lr=1e-2, batch_size=2, log_every=100)
    # seed 4: topping an epoch's remainder up from the next permutation drew the same pair twice (steps 5, 8)
    result, batches, margins = _spied_dpo(monkeypatch, tiny, texts, cfg, steps=8, seed=4)
    assert all(len(set(b)) == len(b) for b in batches)
    assert [len(b) for b in batches] == [2, 1] * 4  # each epoch: one full micro-batch and its short remainder
    for epoch in range(4):
        assert sorted(batches[2 * epoch] + batches[2 * epoch + 1]) == [0, 1, 2]
    assert result.margin == pytest.approx(sum(margins) / len(margins))
    assert len(margins) == 12


def test_statistics_count_each_pair_seen_once_with_fewer_pairs_than_the_batch(tiny, monkeypatch):
    # one pair, batch size 4: every step trains on that pair alone; the margins of the three steps differ
    cfg = DPOConfig(lr=5e-2, batch_size=4, log_every=2)
    result, batches, margins = _spied_dpo(monkeypatch, tiny, [("p1", "yes", "no")], cfg, steps=3)
    assert batches == [[0], [0], [0]] and len(margins) == 3 and len(set(margins)) == 3
    assert result.margin == pytest.approx(sum(margins) / 3)
    assert result.reward_accuracy == pytest.approx(sum(m > 0 for m in margins) / 3)
    assert [h["reward_margin"] for h in result.history] == pytest.approx(
        [(margins[0] + margins[1]) / 2, margins[2]]
    )


def test_dpo_steps_count_micro_batches_per_epoch():
    assert dpo_steps(DPOConfig(batch_size=4, epochs=1.0), 10) == 3  # 4 + 4 + 2
    assert dpo_steps(DPOConfig(batch_size=4, grad_accum=3, epochs=2.0), 10) == 2  # 6 micro-batches
    assert dpo_steps(DPOConfig(batch_size=8, epochs=1.0), 3) == 1


def test_dpo_scores_the_tokens_the_policy_sampled(tiny):
    """A policy scripted to answer " A the" or " B the" (each first token with probability 1/2, then certain):
    the labelled pairs carry those ids, stop token included, and DPO scores exactly them. Decoding, stripping
    and re-tokenising would give "A" for the sampled " A" (a token the policy gives probability ~0)."""
    from fedbiscuit.config import SelectorConfig
    from fedbiscuit.models.tiny import scripted_model
    from fedbiscuit.rlhf.generation import sample, stop_token_ids
    from fedbiscuit.rlhf.labelling import label_candidates
    from fedbiscuit.selector import build_encoder

    judge_model, tok = tiny
    eos = tok.eos_token_id
    q, sp_a, sp_b, sp_t, he = tok.convert_tokens_to_ids(["?", "ĠA", "ĠB", "Ġt", "he"])
    script = {q: [sp_a, sp_b], sp_a: sp_t, sp_b: sp_t, sp_t: he, he: eos}
    policy = scripted_model(len(tok), script, eos_token_id=eos)
    gen = GenerationConfig(num_candidates=2, max_new_tokens=8, chat_template=False)
    prompts = ["question one?", "question two?", "question three?", "question four?"]
    cands = sample(policy, tok, prompts, gen, seed=0)
    answers = {(sp_a, sp_t, he, eos): "A the", (sp_b, sp_t, he, eos): "B the"}
    for row_ids, row_texts in zip(cands.tokens, cands.texts, strict=True):
        assert [answers[tuple(ids)] for ids in row_ids] == row_texts

    judge_model = add_adapter(judge_model, "selector", LoraSettings(r=4, alpha=8, dropout=0.0))
    encoder, choice_ids = build_encoder(
        tok, SelectorConfig(template="Q:{prompt}\nA:{response_a}\nB:{response_b}\nAnswer:"), "generic"
    )
    selectors = {"s": adapter_state(judge_model, "selector")}
    labels = label_candidates(judge_model, encoder, choice_ids, selectors, cands, slot="selector")
    assert labels.pairs  # the seed gives prompts whose two samples differ
    prefs = encode_preferences(tok, labels.pairs, gen, stops=stop_token_ids(policy, tok))
    for pair, pref in zip(labels.pairs, prefs, strict=True):
        assert {tuple(pref.chosen), tuple(pref.rejected)} == set(answers)
        assert answers[tuple(pref.chosen)] == pair.chosen and answers[tuple(pref.rejected)] == pair.rejected
    assert tok("A the", add_special_tokens=False).input_ids[0] != sp_a  # why the text is not re-tokenised
    with torch.no_grad():
        chosen, rejected = pair_logps(policy, prefs, tok.pad_token_id)
    expected = torch.full_like(chosen, math.log(0.5))  # the one coin flip; every other token is certain
    assert torch.allclose(chosen, expected, atol=1e-4) and torch.allclose(rejected, expected, atol=1e-4)


def _random_adapter(model, scale=0.5, dropout=0.0, seed=0):
    model = add_adapter(model, "policy", LoraSettings(r=4, alpha=8, dropout=dropout))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)
    return model


def test_ipo_is_on_the_average_log_probability_per_token(tiny):
    model, tok = tiny
    model = _random_adapter(model)
    pairs = [HumanPair("q1?", "yes indeed, it is", "no"), HumanPair("q2?", "ok", "not at all, really")]
    prefs = encode_preferences(tok, pairs, GenerationConfig(chat_template=False))
    ref = reference_logps(model, prefs, tok.pad_token_id)
    with torch.no_grad():
        pc, pr = pair_logps(model, prefs, tok.pad_token_id)
    n_c = torch.tensor([float(len(p.chosen)) for p in prefs])
    n_r = torch.tensor([float(len(p.rejected)) for p in prefs])
    assert (n_c != n_r).all()
    beta = 0.1
    dc, dr = (pc - ref[:, 0]) / n_c, (pr - ref[:, 1]) / n_r
    expected = ((dc - dr - 1 / (2 * beta)) ** 2).mean().item()
    on_sums = ((pc - ref[:, 0] - (pr - ref[:, 1]) - 1 / (2 * beta)) ** 2).mean().item()
    assert abs(on_sums - expected) > 0.1  # the two readings differ here
    cfg = DPOConfig(loss="ipo", beta=beta, batch_size=2, log_every=1, lr=1e-3)
    (first,) = train_dpo(model, "policy", prefs, ref, cfg, tok.pad_token_id, steps=1).history
    assert first["loss"] == pytest.approx(expected, rel=1e-5)  # the loss before the first update
    assert first["chosen_reward"] == pytest.approx(beta * dc.mean().item(), rel=1e-5, abs=1e-7)
    assert first["rejected_reward"] == pytest.approx(beta * dr.mean().item(), rel=1e-5, abs=1e-7)


def test_policy_and_reference_agree_at_step_zero_despite_dropout(tiny, monkeypatch):
    """A base with attention dropout and a LoRA adapter with dropout 0.5: the policy's first forward pass
    gives exactly the reference's log-probabilities (fresh adapter), so every log-ratio starts at zero and the
    sigmoid loss at ln 2; with a trained adapter the log-ratios are the deterministic ones, not noise."""
    import fedbiscuit.rlhf.dpo as dpo

    model, tok = tiny
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    model = add_adapter(model, "policy", LoraSettings(r=4, alpha=8, dropout=0.5))
    prefs = _prefs(tok, 4)
    ref = reference_logps(model, prefs, tok.pad_token_id)
    rewards = []
    real_loss = dpo.dpo_loss

    def spy(*args, **kw):
        out = real_loss(*args, **kw)
        rewards.append(torch.stack(out[1:]))
        return out

    monkeypatch.setattr(dpo, "dpo_loss", spy)
    cfg = DPOConfig(batch_size=4, log_every=1, lr=1e-2)
    (first,) = train_dpo(model, "policy", prefs, ref, cfg, tok.pad_token_id, steps=1).history
    assert torch.equal(rewards[0], torch.zeros_like(rewards[0]))
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    # after training (here: random adapter weights), the first step's log-ratios are the eval-mode ones
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        model.eval()
        pc, pr = pair_logps(model, prefs, tok.pad_token_id)
    rewards.clear()
    monkeypatch.setattr(dpo, "epoch_batches", lambda n, b, g: iter([list(range(n))]))  # pairs in order
    train_dpo(model, "policy", prefs, ref, cfg, tok.pad_token_id, steps=1)
    expected = torch.stack([cfg.beta * (pc - ref[:, 0]), cfg.beta * (pr - ref[:, 1])])
    assert torch.allclose(rewards[0], expected, atol=1e-6) and expected.abs().max() > 1e-2
