"""Rollouts: the KV-cache path equals the no-cache path, left padding is invisible, sampling
is reproducible under a seed and follows the filtered distribution."""

import inspect
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, Gemma3TextConfig, LlamaConfig, Qwen2Config, StaticCache

from distill.data.tasks.tokenizer import chain_tokenizer
from distill.eval.evaluate import generate_greedy, generate_sampled
from distill.training.rollout import (
    Sampling,
    StaticDecode,
    cache_keyword,
    decode_step,
    full_forward_logits,
    left_pad,
    next_tokens,
    prefill,
    rollout,
)

EOS, PAD = 1, 0
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [12, 13, 14, 15]]


TINY = {
    "vocab_size": 40, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 64, "max_position_embeddings": 128, "pad_token_id": PAD, "eos_token_id": EOS,
}  # fmt: skip


def tiny_model(config_class):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config_class(**TINY)).double().eval()  # float64: no near-ties in argmax


@pytest.fixture(scope="module")
def model():
    return tiny_model(LlamaConfig)


def test_kv_cache_equals_no_cache_greedy(model):
    greedy = Sampling(max_new_tokens=24, temperature=0)
    cached = rollout(model, PROMPTS, greedy, EOS, PAD)
    plain = rollout(model, PROMPTS, greedy, EOS, PAD, use_cache=False)
    assert cached.completions == plain.completions
    assert any(len(c) > 3 for c in cached.completions)


@pytest.fixture(scope="module")
def gemma3():
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=64, max_position_embeddings=128, sliding_window=4, pad_token_id=PAD, eos_token_id=EOS,
        bos_token_id=2,
    )
    return AutoModelForCausalLM.from_config(cfg).double().eval()


@pytest.mark.parametrize("family", ["model", "gemma3"])
def test_the_cache_is_used_not_dropped(family, request):
    """The model reads and fills the cache it is given (under whichever keyword this
    transformers' forward names): prefill stores every prompt position, each decode step adds
    one, and a step that feeds the new token alone gives the logits of a full forward over
    the whole sequence. A cache passed under a name the forward does not know vanishes into
    its **kwargs: the cache stays empty and the step sees one token with no past."""
    m = request.getfixturevalue(family)
    ids, mask = left_pad(PROMPTS, PAD)
    cache = DynamicCache(config=m.config)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # nor a deprecated keyword
        logits = prefill(m, ids, mask, cache)
        assert cache.get_seq_length() == ids.shape[1]
        torch.testing.assert_close(logits, full_forward_logits(m, ids, mask))
        for _ in range(6):  # past gemma3's sliding window of 4
            token = logits.argmax(-1)
            ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(token)[:, None]], 1)
            logits = decode_step(m, token, mask, cache)
            assert cache.get_seq_length() == ids.shape[1]
            torch.testing.assert_close(logits, full_forward_logits(m, ids, mask))


def test_cache_keyword_is_the_one_the_forward_names(model, gemma3):
    for m in (model, gemma3):
        assert cache_keyword(m) in inspect.signature(type(m).forward).parameters

    class NoCache(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, **kwargs):
            return input_ids

    with pytest.raises(TypeError, match="takes no KV cache"):
        cache_keyword(NoCache())


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


@pytest.fixture(scope="module")
def qwen2():
    return tiny_model(Qwen2Config)


@pytest.mark.parametrize("family", ["model", "qwen2", "gemma3"])
def test_static_cache_gives_the_dynamic_cache_logits(family, request):
    """Prefill and decode into a StaticCache with a mask as wide as the cache (zeros where
    nothing is written yet): each step's logits are the dynamic cache's, past gemma3's
    sliding window of 4 too, and a sampled rollout writes the same completions."""
    m = request.getfixturevalue(family)
    ids, mask = left_pad(PROMPTS, PAD)
    width, length = ids.shape[1], 24
    dynamic, static = DynamicCache(config=m.config), StaticCache(config=m.config, max_cache_len=length)
    wide = torch.nn.functional.pad(mask, (0, length - width))
    with torch.no_grad():
        logits = prefill(m, ids, mask, dynamic)
        torch.testing.assert_close(prefill(m, ids, wide, static), logits)
        for step in range(8):
            token = logits.argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)[:, None]], 1)
            wide[:, width + step] = 1
            logits = decode_step(m, token, mask, dynamic)
            torch.testing.assert_close(decode_step(m, token, wide, static), logits)
    sampling = Sampling(16, temperature=1.0, min_new_tokens=4)
    assert rollout(m, PROMPTS, sampling, EOS, PAD, [7, 8, 9], static=StaticDecode(8, compiled=False)) == rollout(
        m, PROMPTS, sampling, EOS, PAD, [7, 8, 9]
    )


def _compiled_frames() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_static_decode_compiles_once_and_samples_the_same(model, gemma3):
    """The compiled decode step (inductor) is compiled at the first rollout and reused by
    the next ones (fixed shapes), and samples what the eager static path samples. A model
    with sliding-window layers decodes uncompiled: its mask's offsets change every step."""
    torch._dynamo.reset()
    sampling = Sampling(12, temperature=1.0, min_new_tokens=12)
    static = StaticDecode(16)
    first = rollout(model, PROMPTS, sampling, EOS, PAD, [1, 2, 3], static=static)
    compiled = _compiled_frames()
    assert compiled >= 1
    again = rollout(model, PROMPTS, sampling, EOS, PAD, [4, 5, 6], static=static)
    assert _compiled_frames() == compiled  # no recompile for new prompts and draws of the same shape
    eager = StaticDecode(16, compiled=False)
    assert first == rollout(model, PROMPTS, sampling, EOS, PAD, [1, 2, 3], static=eager)
    assert again == rollout(model, PROMPTS, sampling, EOS, PAD, [4, 5, 6], static=eager)
    rollout(gemma3, PROMPTS, sampling, EOS, PAD, [1, 2, 3], static=static)
    assert _compiled_frames() == compiled


def test_static_cache_is_the_rollout_rounded_up_to_the_bucket(model, monkeypatch):
    lengths = []
    real = StaticCache.__init__
    monkeypatch.setattr(StaticCache, "__init__", lambda self, config, max_cache_len, **kw: lengths.append(max_cache_len)
                        or real(self, config, max_cache_len, **kw))  # fmt: skip
    for new, bucket in ((12, 16), (9, 16), (10, 16), (12, 64)):
        rollout(model, PROMPTS, Sampling(new, temperature=0), EOS, PAD, static=StaticDecode(bucket, compiled=False))
    assert lengths == [32, 16, 32, 64]  # the 7-token prompt + 12, 9, 10 new tokens


def test_sampled_generations_do_not_depend_on_the_batch_size():
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
