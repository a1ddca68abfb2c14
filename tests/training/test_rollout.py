"""Rollouts: the KV-cache path equals the no-cache path, left padding is invisible, sampling
is reproducible under a seed and follows the filtered distribution."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from distill.training.rollout import Sampling, decode_step, left_pad, next_tokens, prefill, rollout

EOS, PAD = 1, 0
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [12, 13, 14, 15]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128, pad_token_id=PAD, eos_token_id=EOS,
    )
    return AutoModelForCausalLM.from_config(cfg).double().eval()  # float64: no near-ties in argmax


def test_kv_cache_equals_no_cache_greedy(model):
    greedy = Sampling(max_new_tokens=24, temperature=0)
    cached = rollout(model, PROMPTS, greedy, EOS, PAD)
    plain = rollout(model, PROMPTS, greedy, EOS, PAD, use_cache=False)
    assert cached.completions == plain.completions
    assert any(len(c) > 3 for c in cached.completions)


def test_greedy_matches_transformers_generate(model):
    greedy = Sampling(max_new_tokens=16, temperature=0)
    ours = rollout(model, PROMPTS, greedy, EOS, PAD)
    for prompt, mine in zip(PROMPTS, ours.completions):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
        assert ref[0, len(prompt) :].tolist()[: len(mine)] == mine


def test_left_padding_changes_nothing(model):
    """Each row sampled in a padded batch equals the row sampled alone (greedy and sampled)."""
    for sampling in (Sampling(20, temperature=0), Sampling(20, temperature=1.0, top_k=8)):
        seeds = [11, 12, 13]
        together = rollout(model, PROMPTS, sampling, EOS, PAD, seeds)
        for i, prompt in enumerate(PROMPTS):
            alone = rollout(model, [prompt], sampling, EOS, PAD, [seeds[i]])
            assert alone.completions[0] == together.completions[i]


def test_sampling_is_reproducible_under_a_seed(model):
    sampling = Sampling(20, temperature=1.3, top_p=0.95)
    a = rollout(model, PROMPTS, sampling, EOS, PAD, [1, 2, 3])
    b = rollout(model, PROMPTS, sampling, EOS, PAD, [1, 2, 3])
    c = rollout(model, PROMPTS, sampling, EOS, PAD, [4, 5, 6])
    assert a.completions == b.completions
    assert a.completions != c.completions
    nocache = rollout(model, PROMPTS, sampling, EOS, PAD, [1, 2, 3], use_cache=False)
    assert nocache.completions == a.completions  # same draws, same distribution, no cache


def test_completions_stop_at_eos_and_keep_it(model):
    with torch.no_grad():
        saved = model.lm_head.weight[EOS].clone()
        model.lm_head.weight[EOS] = model.lm_head.weight[7] * 3  # EOS wherever 7 would win
    try:
        out = rollout(model, PROMPTS, Sampling(30, temperature=0), EOS, PAD)
        forced = rollout(model, PROMPTS, Sampling(30, temperature=0, min_new_tokens=30), EOS, PAD)
    finally:
        with torch.no_grad():
            model.lm_head.weight[EOS] = saved
    for completion, ended in zip(out.completions, out.ended):
        assert ended == (EOS in completion)
        if ended:
            assert completion.index(EOS) == len(completion) - 1
        else:
            assert len(completion) == 30
    assert out.generated_tokens == sum(len(c) for c in out.completions)
    assert any(out.ended)
    assert all(len(c) == 30 and EOS not in c for c in forced.completions)


def test_sampling_needs_seeds_and_prompts(model):
    with pytest.raises(ValueError, match="seed per prompt"):
        rollout(model, PROMPTS, Sampling(4, temperature=1.0), EOS, PAD)
    with pytest.raises(ValueError, match="empty"):
        left_pad([[1, 2], []], PAD)


def test_next_tokens_follows_the_filtered_distribution():
    torch.manual_seed(0)
    logits = torch.randn(1, 12).double()
    n = 200_000
    u = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for sampling in (Sampling(1, 0.7), Sampling(1, 1.0, top_k=4), Sampling(1, 1.0, top_p=0.6)):
        picks = next_tokens(logits.expand(n, -1), u, sampling)
        freq = torch.bincount(picks, minlength=12).double() / n
        p = (logits[0] / sampling.temperature).softmax(-1)
        order = p.argsort(descending=True)
        keep = torch.zeros(12, dtype=torch.bool)
        if sampling.top_k:
            keep[order[: sampling.top_k]] = True
        elif sampling.top_p < 1:
            before = p[order].cumsum(0) - p[order]
            keep[order[before < sampling.top_p]] = True
        else:
            keep[:] = True
        expected = torch.where(keep, p, 0.0)
        expected /= expected.sum()
        assert (freq[~keep] == 0).all()
        torch.testing.assert_close(freq, expected, atol=5e-3, rtol=0)
    assert next_tokens(logits, None, Sampling(1, 0)).item() == logits.argmax().item()


def test_decode_step_compiles(model):
    """prefill / decode_step are plain tensor functions: torch.compile takes the decode step
    and gives the eager logits."""
    ids, mask = left_pad(PROMPTS, PAD)
    eager_cache, compiled_cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        token = prefill(model, ids, mask, eager_cache).argmax(-1)
        prefill(model, ids, mask, compiled_cache)
        mask = torch.cat([mask, torch.ones(len(PROMPTS), 1, dtype=torch.long)], dim=1)
        step = torch.compile(decode_step, backend="aot_eager")
        torch.testing.assert_close(step(model, token, mask, compiled_cache), decode_step(model, token, mask, eager_cache))


def test_sampled_generations_do_not_depend_on_the_batch_size():
    from distill.data.tasks.tokenizer import chain_tokenizer
    from distill.eval.evaluate import generate_greedy, generate_sampled

    tok = chain_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    model = AutoModelForCausalLM.from_config(cfg).double()
    prompts = ["Q:1+2*3=", "Q:4-5=", "Q:7*7+1-2="]
    sampling = Sampling(12, temperature=1.0)
    assert generate_sampled(model, tok, prompts, sampling, 3, 3) == generate_sampled(model, tok, prompts, sampling, 3, 2)
    assert generate_sampled(model, tok, prompts, sampling, 3, 3) != generate_sampled(model, tok, prompts, sampling, 4, 3)
    greedy = generate_sampled(model, tok, prompts, Sampling(12, temperature=0), 0, 2)
    assert greedy == generate_greedy(model, tok, prompts, 12, 3)
