import math
import random

import pytest
import torch
from transformers import AutoTokenizer

from distill.data.tasks.grammar import (
    END,
    PROMPT_MARK,
    Grammar,
    Sample,
    entropy_per_token,
    generate_split,
    kl_to_truth,
    make_grammar,
    sample_row,
    state_of,
    true_next_token_probs,
    true_probs_tensor,
)
from distill.data.tasks.tokenizer import chain_tokenizer

# 2 states over "ab", order 1: after 'a' state 0, after 'b' state 1; ends from 2 symbols on, always at 4.
TINY = Grammar("ab", 1, (0, 1), ((0.9, 0.1), (0.5, 0.5)), (0.2, 0.0), min_len=2, max_len=4)


def _text(row: Sample) -> str:
    return row.prompt + row.completion


def test_generation_is_deterministic_per_seed():
    assert make_grammar(3) == make_grammar(3)
    assert make_grammar(3) != make_grammar(4)
    rows = generate_split("train", 50, seed=3)
    assert rows == generate_split("train", 50, seed=3)
    assert rows != generate_split("train", 50, seed=4)
    with pytest.raises(ValueError, match="split"):
        generate_split("dev", 1)


def test_splits_are_disjoint_and_prefix_stable():
    train = {_text(r) for r in generate_split("train", 1000)}
    val = {_text(r) for r in generate_split("val", 100)}
    test = {_text(r) for r in generate_split("test", 300)}
    assert not train & val and not train & test and not val & test
    assert generate_split("test", 50) == generate_split("test", 300)[:50]
    assert generate_split("train", 200) == generate_split("train", 1000)[:200]


def test_true_distributions_are_normalised_on_the_grammar_support():
    g = make_grammar(0)
    support = set(g.symbols) | {END}
    for row in generate_split("val", 200, grammar=g):
        assert row.prompt.startswith(PROMPT_MARK) and len(row.prompt) == len(PROMPT_MARK) + g.order
        n_symbols = g.order + len(row.completion)
        assert g.min_len <= n_symbols <= g.max_len
        dists = true_next_token_probs(g, row.prompt, row.completion)
        assert len(dists) == len(row.completion) + 1
        text = row.prompt[len(PROMPT_MARK) :] + row.completion
        for t, d in enumerate(dists, start=g.order):
            assert set(d) == support and abs(sum(d.values()) - 1.0) < 1e-9 and min(d.values()) >= 0.0
            assert d[END] == (0.0 if t < g.min_len else 1.0 if t == g.max_len else g.stop[state_of(g, text[:t])])
        for ch, d in zip(row.completion, dists):
            assert d[ch] > 0.0  # every observed symbol was possible


def _chi_square(pairs: list[tuple[dict[str, float], str]]) -> tuple[float, int]:
    """Pearson's statistic of observed outcomes against their distributions, grouped by distribution.

    Cells with fewer than 5 expected counts are pooled (and a small pool merged into the
    smallest kept cell), so every group's cells partition its observations.
    """
    groups: dict[tuple, list[str]] = {}
    for dist, outcome in pairs:
        groups.setdefault(tuple(sorted(dist.items())), []).append(outcome)
    stat, dof = 0.0, 0
    for key, outcomes in groups.items():
        n = len(outcomes)
        if n < 50:
            continue
        dist = dict(key)
        counts = {k: outcomes.count(k) for k in dist}
        kept = [[dist[k] * n, counts[k]] for k in dist if dist[k] * n >= 5]
        pool = [sum(dist[k] * n for k in dist if dist[k] * n < 5), sum(counts[k] for k in dist if dist[k] * n < 5)]
        if pool[0] >= 5 or not kept:
            kept.append(pool)
        elif pool[0] > 0 or pool[1] > 0:
            smallest = min(kept, key=lambda c: c[0])
            smallest[0] += pool[0]
            smallest[1] += pool[1]
        if len(kept) < 2:
            continue
        stat += sum((obs - exp) ** 2 / exp for exp, obs in kept)
        dof += len(kept) - 1
    return stat, dof


def test_true_distributions_match_the_process_frequencies():
    g = make_grammar(0)
    rng = random.Random(12345)
    pairs, shifted = [], []
    for _ in range(2000):
        row = sample_row(g, rng)
        dists = true_next_token_probs(g, row.prompt, row.completion)
        outcomes = list(row.completion) + [END]
        pairs += zip(dists, outcomes)
        shifted += zip(dists[:-1], outcomes[1:])  # an off-by-one truth, which the test must reject
    stat, dof = _chi_square(pairs)
    assert dof > 150  # enough cells for the test to have power
    limit = dof + 6 * math.sqrt(2 * dof)  # six standard deviations of chi-square(dof)
    assert stat < limit, (stat, dof)
    bad_stat, bad_dof = _chi_square(shifted)
    assert bad_stat > 10 * (bad_dof + 6 * math.sqrt(2 * bad_dof))


def test_tokenizer_encodes_rows_and_dense_truth_sits_on_the_right_ids(tmp_path):
    chain_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    g = make_grammar(0)
    rows = generate_split("train", 100, grammar=g) + generate_split("test", 20, grammar=g)
    for row in rows:
        ids = tok(_text(row), add_special_tokens=False).input_ids
        assert tok.unk_token_id not in ids and len(ids) == len(_text(row))
    eos = tok.eos_token_id
    for row in rows[:20]:
        truth = true_probs_tensor(g, row.prompt, row.completion, tok, dtype=torch.float64)  # (n, V)
        dists = true_next_token_probs(g, row.prompt, row.completion)
        assert truth.shape == (len(row.completion) + 1, len(tok))
        assert torch.allclose(truth.sum(-1), torch.ones(len(dists), dtype=torch.float64), atol=1e-9)
        for i, d in enumerate(dists):
            assert truth[i, eos].item() == d[END]
            for ch in g.symbols:
                assert truth[i, tok.convert_tokens_to_ids(ch)].item() == d[ch]
        support = [tok.convert_tokens_to_ids(ch) for ch in g.symbols] + [eos]
        off = torch.ones(len(tok), dtype=torch.bool)  # (V,)
        off[support] = False
        assert truth[:, off].abs().sum().item() == 0.0
        kl_self = kl_to_truth(truth, truth.clamp_min(1e-300).log())  # (n,)
        assert kl_self.abs().max().item() < 1e-9
        entropy = -(truth * truth.clamp_min(1e-300).log()).sum(-1)  # (n,)
        kl_uniform = kl_to_truth(truth, torch.zeros_like(truth))  # (n,)
        assert torch.allclose(kl_uniform, math.log(len(tok)) - entropy, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_and_lengths_are_in_the_designed_range(seed):
    rows = generate_split("train", 500, seed=seed)
    h = entropy_per_token(make_grammar(seed), rows)
    assert 1.0 < h < 1.7, h  # designed for 1.2-1.5 nats per token
    lengths = [len(r.completion) for r in rows]
    assert 20 < sum(lengths) / len(lengths) < 40


def test_hand_computed_tiny_grammar():
    assert state_of(TINY, "a") == 0 and state_of(TINY, "bab") == 1
    d = true_next_token_probs(TINY, "G:a", "ab")
    assert d[0] == pytest.approx({"a": 0.9, "b": 0.1, END: 0.0}, abs=1e-12)  # 1 symbol < min_len: no end
    assert d[1] == pytest.approx({"a": 0.72, "b": 0.08, END: 0.2}, abs=1e-12)  # after "aa": state 0, may end
    assert d[2] == pytest.approx({"a": 0.5, "b": 0.5, END: 0.0}, abs=1e-12)  # after "aab": state 1 never ends
    d = true_next_token_probs(TINY, "G:a", "bab")
    assert d[3] == {"a": 0.0, "b": 0.0, END: 1.0}  # max_len reached
    h0 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    h1 = -(0.72 * math.log(0.72) + 0.08 * math.log(0.08) + 0.2 * math.log(0.2))
    h2 = math.log(2)
    assert entropy_per_token(TINY, [Sample("G:a", "ab")]) == pytest.approx((h0 + h1 + h2) / 3, abs=1e-12)
    # Order 2: the state is read off the last two symbols, context index 2 * first + second.
    g2 = Grammar("ab", 2, (0, 1, 1, 0), ((0.3, 0.7), (0.6, 0.4)), (0.0, 1.0), min_len=2, max_len=6)
    assert [state_of(g2, s) for s in ("aa", "ab", "ba", "bb", "aab")] == [0, 1, 1, 0, 1]
    assert true_next_token_probs(g2, "G:ab", "")[0] == {"a": 0.0, "b": 0.0, END: 1.0}
    rng = random.Random(0)
    assert all(2 <= len(r.prompt) - 2 + len(r.completion) <= 4 for r in (sample_row(TINY, rng) for _ in range(200)))


def test_invalid_inputs_are_rejected():
    with pytest.raises(ValueError):
        true_next_token_probs(TINY, "G:a", "abbb")  # 5 symbols: beyond max_len
    with pytest.raises(ValueError):
        true_next_token_probs(TINY, "Q:a", "ab")
    with pytest.raises(ValueError):
        true_next_token_probs(TINY, "G:a", "az")
    with pytest.raises(ValueError):
        true_next_token_probs(TINY, "G:", "ab")  # the state needs `order` symbols
    with pytest.raises(ValueError):
        Grammar("ab", 1, (0, 1), ((0.9, 0.2), (0.5, 0.5)), (0.2, 0.0), min_len=2, max_len=4)
