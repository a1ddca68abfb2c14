import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.loss.divergences import (
    DIVERGENCES,
    divergence,
    per_token,
    sparse_divergence,
    sparse_per_token,
)

INF = math.inf
# Parameter settings tested per divergence, endpoints included. The names come from the
# registry: a registered divergence missing here is tested at its defaults.
PARAM_CASES = {
    "jsd": [{"beta": 0.0}, {"beta": 0.1}, {"beta": 0.5}, {"beta": 0.9}, {"beta": 1.0}],
    "skew_forward_kl": [{"alpha": 0.0}, {"alpha": 0.1}],
    "skew_reverse_kl": [{"alpha": 0.0}, {"alpha": 0.1}],
}
CONFIGS = [(name, params) for name, spec in DIVERGENCES.items() for params in PARAM_CASES.get(name, [spec.defaults()])]
SPARSE_CONFIGS = [(name, params) for name, params in CONFIGS if DIVERGENCES[name].sparse]


def config_ids(configs):
    return [f"{n}-{'-'.join(f'{k}={v}' for k, v in p.items())}" for n, p in configs]


IDS, SPARSE_IDS = config_ids(CONFIGS), config_ids(SPARSE_CONFIGS)
# Expectations under the student: +inf (their true value) where the student covers an id
# the teacher gives no mass.
REVERSE_SUPPORT = {("reverse_kl", ()), ("jsd", (("beta", 1.0),)), ("skew_reverse_kl", (("alpha", 0.0),))}


def is_reverse_support(name, params):
    return (name, tuple(params.items())) in REVERSE_SUPPORT


def rand(*shape, seed, scale=1.0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def logits_of(probs, temperature=1.0):
    """Logits whose softmax at `temperature` is `probs` (0 -> -inf)."""
    return torch.tensor([probs], dtype=torch.float64).log() * temperature


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


# --- 1. hand-computed values ---------------------------------------------------------------


def test_hand_computed_three_token_vocab():
    p, q, T = [0.7, 0.2, 0.1], [0.4, 0.4, 0.2], 2.0
    s, t = logits_of(q, T), logits_of(p, T)
    m = [0.55, 0.3, 0.15]  # 0.5 p + 0.5 q
    expected = {
        ("forward_kl", ()): 0.7 * math.log(0.7 / 0.4) + 0.2 * math.log(0.5) + 0.1 * math.log(0.5),
        ("reverse_kl", ()): 0.4 * math.log(0.4 / 0.7) + 0.4 * math.log(2) + 0.2 * math.log(2),
        ("tvd", ()): 0.5 * (0.3 + 0.2 + 0.1),
        # normalised: (0.5 KL(p||m) + 0.5 KL(q||m)) / 0.25
        ("jsd", (("beta", 0.5),)): 2 * (
            0.7 * math.log(0.7 / 0.55) + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(0.1 / 0.15)
            + 0.4 * math.log(0.4 / 0.55) + 0.4 * math.log(0.4 / 0.3) + 0.2 * math.log(0.2 / 0.15)
        ),
        ("skew_forward_kl", (("alpha", 0.5),)): kl(p, m),
        ("skew_reverse_kl", (("alpha", 0.5),)): kl(q, m),
    }
    assert expected[("forward_kl", ())] == pytest.approx(0.7 * math.log(1.75) - 0.3 * math.log(2))
    for (name, params), value in expected.items():
        assert per_token(name, s, t, T, **dict(params)).item() == pytest.approx(value, rel=1e-12), name


def test_hand_computed_zero_mass_teacher_id():
    p, q = [0.5, 0.5, 0.0], [0.25, 0.25, 0.5]  # the teacher rules id 2 out (logit -inf)
    s, t = logits_of(q), logits_of(p)
    assert per_token("forward_kl", s, t).item() == pytest.approx(math.log(2))  # 2 * 0.5 ln(0.5/0.25)
    assert per_token("tvd", s, t).item() == pytest.approx(0.5)
    assert per_token("reverse_kl", s, t).item() == INF  # 0.5 * ln(0.5 / 0)
    # m = 0.5 q + 0.5 p = (0.375, 0.375, 0.25): 2 * 0.25 ln(2/3) + 0.5 ln 2 = 0.5 ln(4/3)
    assert per_token("skew_reverse_kl", s, t, alpha=0.5).item() == pytest.approx(0.5 * math.log(4 / 3))


def test_hand_computed_sparse_buckets():
    # V = 4, teacher top-2 ids (1, 0) with p = 0.3, 0.5 -> leftover 0.2; student buckets
    # (q1, q0, q2 + q3) = (0.2, 0.4, 0.4).
    s = logits_of([0.4, 0.2, 0.3, 0.1], 1.5)
    ids = torch.tensor([[1, 0]])
    logp = torch.tensor([[0.3, 0.5]], dtype=torch.float64).log()
    fwd = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.4)
    assert sparse_per_token("forward_kl", s, ids, logp, 1.5).item() == pytest.approx(fwd, rel=1e-12)
    assert sparse_per_token("tvd", s, ids, logp, 1.5).item() == pytest.approx(0.5 * (0.1 + 0.1 + 0.2))


# --- 2. identities -------------------------------------------------------------------------


@pytest.mark.parametrize("name,params", CONFIGS, ids=IDS)
def test_zero_on_equal_and_nonnegative(name, params):
    x, y = rand(5, 7, seed=3, scale=4), rand(5, 7, seed=4, scale=4)
    assert per_token(name, x, x, 1.3, **params).abs().max().item() < 1e-12
    assert per_token(name, x, y, 1.3, **params).min().item() > 0


def test_jsd_symmetry_mirror_and_exact_endpoints():
    s, t = rand(4, 6, seed=5, scale=2), rand(4, 6, seed=6, scale=2)
    torch.testing.assert_close(per_token("jsd", s, t, beta=0.5), per_token("jsd", t, s, beta=0.5), rtol=1e-12, atol=0)
    # jsd_beta(q, p) = jsd_{1-beta}(p, q) for every beta
    torch.testing.assert_close(per_token("jsd", s, t, beta=0.3), per_token("jsd", t, s, beta=0.7), rtol=1e-12, atol=0)
    assert torch.equal(per_token("jsd", s, t, beta=0.0), per_token("forward_kl", s, t))
    assert torch.equal(per_token("jsd", s, t, beta=1.0), per_token("reverse_kl", s, t))


def test_jsd_continuity_at_both_ends():
    """jsd(beta) = KL(p||q) + beta * (KL(p||q) - chi2(p||q) / 2) + O(beta^2); mirrored at 1.

    The O(beta^2) term grows with the likelihood ratio, so it is bounded by beta^2 * |coeff| *
    max(p / q) (max(q / p) at the other end), measured here to hold with a factor ~3 margin.
    """
    s, t = rand(4, 6, seed=7, scale=2), rand(4, 6, seed=8, scale=2)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    eps = 1e-4
    for beta, kl_end, chi2, ratio in [
        (eps, per_token("forward_kl", s, t), ((p - q) ** 2 / q).sum(-1), (p / q).amax(-1)),
        (1 - eps, per_token("reverse_kl", s, t), ((q - p) ** 2 / p).sum(-1), (q / p).amax(-1)),
    ]:
        coeff = kl_end - chi2 / 2  # first-order term, per token
        second = eps * ratio * coeff.abs()  # bound on (the O(beta^2) term) / beta
        j = per_token("jsd", s, t, beta=beta)
        # continuity: |jsd - KL| is the O(beta) error term ...
        assert ((j - kl_end).abs() <= eps * (coeff.abs() + second)).all()
        # ... and its coefficient is the derived one.
        assert (((j - kl_end) / eps - coeff).abs() <= second + 1e-6).all()


def test_skew_endpoints_and_tvd_bound():
    s, t = rand(4, 6, seed=9, scale=2), rand(4, 6, seed=10, scale=2)
    assert torch.equal(per_token("skew_forward_kl", s, t, alpha=0.0), per_token("forward_kl", s, t))
    assert torch.equal(per_token("skew_reverse_kl", s, t, alpha=0.0), per_token("reverse_kl", s, t))
    assert per_token("skew_forward_kl", s, t, alpha=1.0).abs().max().item() == 0.0
    # skew lies between 0 and the plain KL (convexity of KL in its second argument)
    sk = per_token("skew_forward_kl", s, t, alpha=0.3)
    assert ((sk > 0) & (sk < per_token("forward_kl", s, t))).all()
    assert per_token("tvd", s, t).max().item() <= 1.0
    disjoint = per_token("tvd", torch.tensor([[1e4, -1e4, -INF]]), torch.tensor([[-1e4, 1e4, 0.0]]), 0.05)
    assert disjoint.item() == pytest.approx(1.0) and disjoint.item() <= 1.0


# --- 3. gradcheck ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,params", CONFIGS, ids=IDS)
def test_gradcheck_dense_and_sparse(name, params):
    s = rand(3, 5, seed=11, scale=2).requires_grad_(True)
    t = rand(3, 5, seed=12, scale=2).requires_grad_(True)
    mask = torch.tensor([True, False, True])
    assert torch.autograd.gradcheck(lambda a, b: divergence(name, a, b, mask, 1.7, **params), (s, t))
    if not DIVERGENCES[name].sparse:
        return
    ids = torch.tensor([[4, 0], [1, 2], [3, 1]])
    logp = torch.tensor([[0.5, 0.2], [0.3, 0.3], [0.6, 0.1]], dtype=torch.float64).log().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: sparse_divergence(name, a, ids, b, mask, 1.7, **params), (s, logp))


# --- 4. property tests at the extremes ------------------------------------------------------

EXTREME = st.one_of(st.sampled_from([1e4, -1e4, 9999.5, -9999.0, 0.0]), st.floats(-1e4, 1e4))


@st.composite
def extreme_batch(draw):
    """Logits of +-1e4, -inf teacher ids, student -inf only where the teacher is -inf too."""
    n, v = draw(st.integers(1, 3)), draw(st.integers(2, 5))
    flat = st.lists(EXTREME, min_size=n * v, max_size=n * v)
    s, t = torch.tensor(draw(flat)).view(n, v), torch.tensor(draw(flat)).view(n, v)
    bools = st.lists(st.booleans(), min_size=n * v, max_size=n * v)
    t_dead = torch.tensor(draw(bools)).view(n, v)
    s_dead = torch.tensor(draw(bools)).view(n, v) & t_dead
    alive = torch.tensor(draw(st.lists(st.integers(0, v - 1), min_size=n, max_size=n)))
    t_dead[torch.arange(n), alive] = False  # every teacher row keeps mass somewhere
    s_dead[torch.arange(n), alive] = False
    s, t = s.masked_fill(s_dead, -INF), t.masked_fill(t_dead, -INF)
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    mask[draw(st.integers(0, n - 1))] = True  # some token counts (all masked: tested below)
    temperature = draw(st.floats(0.05, 20.0))
    k = draw(st.integers(1, v))
    return s.to(dtype), t.to(dtype), t_dead, mask, temperature, k


@settings(max_examples=50, deadline=None)
@given(extreme_batch())
def test_extremes_finite_or_true_infinity_never_nan(case):
    s0, t0, t_dead, mask, temperature, k = case
    exact = torch.float64 if s0.dtype == torch.float64 else torch.float32
    # student mass that did not underflow, on ids the teacher rules out
    uncovered = t_dead & (torch.log_softmax(s0.to(exact) / temperature, -1).exp() > 0)  # (n, v)
    for name, params in CONFIGS:
        s, t = s0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
        out = divergence(name, s, t, mask, temperature, **params)
        out.backward()
        assert out.dtype == exact
        assert torch.equal(s.grad[~mask], torch.zeros_like(s.grad[~mask]))  # masked: exactly 0
        assert torch.equal(t.grad[~mask], torch.zeros_like(t.grad[~mask]))
        if is_reverse_support(name, params) and uncovered[mask].any():
            assert out.item() == INF, name  # its true value, not NaN
            continue
        assert torch.isfinite(out) and out.item() >= -1e-4, (name, params, out)
        assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all(), (name, params)
        if not DIVERGENCES[name].sparse:
            continue

        # the same batch with a top-k teacher (student gradient; teacher log-probs are data)
        logp_full = torch.log_softmax(t0.double() / temperature, -1)
        top = logp_full.topk(k, dim=-1)
        s = s0.clone().requires_grad_(True)
        out = sparse_divergence(name, s, top.indices, top.values.to(t0.dtype), mask, temperature, **params)
        assert not torch.isnan(out), (name, params)
        if is_reverse_support(name, params) and out.item() == INF:
            continue
        out.backward()
        assert torch.isfinite(out) and out.item() >= -1e-4, (name, params, out)
        assert torch.isfinite(s.grad).all() and torch.equal(s.grad[~mask], torch.zeros_like(s.grad[~mask]))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.one_of(EXTREME, st.just(-INF)), min_size=8, max_size=8),
    st.lists(st.one_of(EXTREME, st.just(-INF)), min_size=8, max_size=8),
    st.floats(0.05, 20.0),
    st.lists(st.integers(-5, 9), min_size=4, max_size=4),
)
def test_fully_masked_is_exactly_zero(s_vals, t_vals, temperature, garbage_ids):
    """Anything at masked positions (all -inf rows, out-of-range ids) gives 0 and 0 gradient."""
    mask = torch.zeros(2, dtype=torch.bool)
    ids = torch.tensor(garbage_ids).view(2, 2)
    for name, params in CONFIGS:
        s = torch.tensor(s_vals).view(2, 4).requires_grad_(True)
        t = torch.tensor(t_vals).view(2, 4).requires_grad_(True)
        out = divergence(name, s, t, mask, temperature, **params)
        out.backward()
        assert out.item() == 0.0
        assert torch.equal(s.grad, torch.zeros_like(s)) and torch.equal(t.grad, torch.zeros_like(t))
        if not DIVERGENCES[name].sparse:
            continue
        logp = torch.tensor(t_vals[:4]).view(2, 2).requires_grad_(True)
        s.grad = None
        out = sparse_divergence(name, s, ids, logp, mask, temperature, **params)
        out.backward()
        assert out.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))
        assert torch.equal(logp.grad, torch.zeros_like(logp))


def test_num_valid_normalises_the_sum():
    s, t = rand(2, 3, 5, seed=30), rand(2, 3, 5, seed=31)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    for name, params in CONFIGS:
        total = divergence(name, s, t, mask, 1.5, **params)
        for count in (4, torch.tensor(4.0), 7.5):
            mean = divergence(name, s, t, mask, 1.5, num_valid=count, **params)
            torch.testing.assert_close(mean, total / float(count), rtol=1e-12, atol=0)
        if not DIVERGENCES[name].sparse:
            continue
        ids, logp = torch.tensor([[[0, 1]] * 3] * 2), torch.full((2, 3, 2), -1.0, dtype=torch.float64)
        sparse_total = sparse_divergence(name, s, ids, logp, mask, 1.5, **params)
        sparse_mean = sparse_divergence(name, s, ids, logp, mask, 1.5, num_valid=4, **params)
        torch.testing.assert_close(sparse_mean, sparse_total / 4, rtol=1e-12, atol=0)
    nothing = torch.zeros(2, 3, dtype=torch.bool)
    assert divergence("forward_kl", s, t, nothing, num_valid=0).item() == 0.0  # 0 / max(0, 1)
    with pytest.raises(ValueError, match="num_valid must be a finite count"):
        divergence("forward_kl", s, t, mask, num_valid=-1)


def test_masked_rows_drop_out_of_the_sum():
    s, t = rand(4, 6, seed=13, scale=3), rand(4, 6, seed=14, scale=3)
    s[1], t[1, :3] = -INF, -INF  # garbage at a masked row: student all -inf
    s[2, 0], t[2, 1:] = 1e4, -INF  # reverse KL would be +inf here
    mask = torch.tensor([True, False, False, True])
    for name, params in CONFIGS:
        ref = per_token(name, s[mask], t[mask], 0.7, **params).sum()
        assert divergence(name, s, t, mask, 0.7, **params).item() == pytest.approx(ref.item(), rel=1e-12)


def test_sparse_without_rest_bucket_renormalises_the_teacher():
    # bf16-stored log-probs of a 2-id teacher: log 0.5 rounds up, so p_top sums to 1.0017.
    s = logits_of([0.5, 0.5])
    logp = torch.full((1, 2), math.log(0.5)).bfloat16()
    ids = torch.tensor([[0, 1]])
    for name, params in SPARSE_CONFIGS:
        assert sparse_per_token(name, s, ids, logp, **params).abs().item() < 1e-15, name
    # A padded vocabulary: ids 4, 5 are -inf for both, the top-4 covers every live id and the
    # given log-probs leave a rounding residue (fp32); no rest bucket, so equal to dense.
    g = torch.Generator().manual_seed(22)
    s, t = torch.randn(1, 6, generator=g), torch.randn(1, 6, generator=g)
    s[:, 4:], t[:, 4:] = -INF, -INF
    top = torch.log_softmax(t, -1).topk(4, dim=-1)
    for name, params in SPARSE_CONFIGS:
        dense = per_token(name, s, t, **params)
        sparse = sparse_per_token(name, s, top.indices, top.values, **params)
        torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)


# --- 5. sparse teacher ----------------------------------------------------------------------


@pytest.mark.parametrize("name,params", SPARSE_CONFIGS, ids=SPARSE_IDS)
def test_sparse_with_all_ids_equals_dense(name, params):
    s, t = rand(3, 7, seed=15, scale=3), rand(3, 7, seed=16, scale=3)
    t[0, 2], s[0, 2], t[1, 5] = -INF, -INF, -INF  # zero-mass ids, the student following once
    if is_reverse_support(name, params):
        t[1, 5] = 0.0  # keep the reference finite
    ids = torch.stack([torch.randperm(7, generator=torch.Generator().manual_seed(i)) for i in range(3)])
    logp = torch.log_softmax(t / 0.8, -1).gather(-1, ids)
    dense = per_token(name, s, t, 0.8, **params)
    torch.testing.assert_close(sparse_per_token(name, s, ids, logp, 0.8, **params), dense, rtol=1e-10, atol=1e-12)


def test_sparse_forward_kl_gap_shrinks_with_k():
    V = 16
    t = rand(2, V, seed=17, scale=3)
    t[:, 3] += 8.0  # a peaked teacher
    s = rand(2, V, seed=18, scale=1)
    dense = per_token("forward_kl", s, t, 1.0)
    logp = torch.log_softmax(t, -1)
    gaps = []
    for k in (1, 4, V):
        top = logp.topk(k, dim=-1)
        for name, params in SPARSE_CONFIGS:
            v = sparse_per_token(name, s, top.indices, top.values, 1.0, **params)
            assert torch.isfinite(v).all() and (v >= 0).all(), (name, k)
        gaps.append(dense - sparse_per_token("forward_kl", s, top.indices, top.values, 1.0))
    assert (gaps[0] > gaps[1]).all() and (gaps[1] > 0).all()  # bucketing only loses divergence
    assert gaps[2].abs().max().item() < 1e-12


@pytest.mark.parametrize("name,params", SPARSE_CONFIGS, ids=SPARSE_IDS)
def test_sparse_with_a_stored_leftover(name, params):
    """A cache stores log(leftover) exactly; given it, the buckets equal the derived ones,
    and fp16-stored top-k log-probs still give (normalised) buckets near the exact value."""
    V, k = 12, 4
    s, t = rand(3, V, seed=21, scale=2), rand(3, V, seed=22, scale=2)
    t[:, 0] += 6.0  # most mass in the top-k: the leftover is small, where 1 - sum p loses digits
    logp = torch.log_softmax(t / 1.5, -1)
    top = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, top.indices, -INF).logsumexp(-1)  # (3,)
    derived = sparse_per_token(name, s, top.indices, top.values, 1.5, **params)
    stored = sparse_per_token(name, s, top.indices, top.values, 1.5, teacher_rest=rest, **params)
    torch.testing.assert_close(stored, derived, rtol=1e-9, atol=1e-12)
    half = top.values.half().double()
    approx = sparse_per_token(name, s, top.indices, half, 1.5, teacher_rest=rest.float().double(), **params)
    torch.testing.assert_close(approx, derived, rtol=2e-2, atol=2e-3)
    all_ids = logp.topk(V, dim=-1)  # k = V: no rest bucket whatever is passed
    full = sparse_per_token(name, s, all_ids.indices, all_ids.values, 1.5, teacher_rest=rest, **params)
    torch.testing.assert_close(full, per_token(name, s, t, 1.5, **params), rtol=1e-9, atol=1e-12)
    mask = torch.tensor([True, False, True])
    summed = sparse_divergence(name, s, top.indices, top.values, mask, 1.5, teacher_rest=rest, **params)
    torch.testing.assert_close(summed, stored[mask].sum(), rtol=1e-12, atol=1e-12)
    s = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a: sparse_divergence(name, a, top.indices, top.values, mask, 1.5, teacher_rest=rest, **params), (s,)
    )


# --- 6. dtypes and errors -------------------------------------------------------------------


def test_dtypes():
    s, t = rand(3, 8, seed=19, dtype=torch.float32), rand(3, 8, seed=20, dtype=torch.float32)
    mask = torch.ones(3, dtype=torch.bool)
    ids = torch.tensor([[0, 1]] * 3)
    logp = torch.full((3, 2), -2.0)
    for low in (torch.bfloat16, torch.float16):
        out = divergence("jsd", s.to(low), t.to(low), mask, 2.0)
        assert out.dtype == torch.float32
        ref = divergence("jsd", s.to(low).float(), t.to(low).float(), mask, 2.0)
        assert out.item() == pytest.approx(ref.item(), rel=1e-6)
        assert sparse_divergence("tvd", s.to(low), ids, logp.to(low), mask).dtype == torch.float32
    assert divergence("tvd", s.double(), t.double(), mask).dtype == torch.float64
    assert divergence("tvd", s.bfloat16(), t.double(), mask).dtype == torch.float64
    assert sparse_per_token("reverse_kl", s.double(), ids, logp, 1.0).dtype == torch.float64


def test_the_test_tables_name_registered_divergences():
    """A stale parameter table fails loudly; every registered name is tested."""
    assert set(PARAM_CASES) <= set(DIVERGENCES)
    assert list(DIVERGENCES) == list(dict.fromkeys(n for n, _ in CONFIGS))
    for name, cases in PARAM_CASES.items():
        for params in cases:
            DIVERGENCES[name].check_params(params)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda s, m: divergence("kl", s, s, m), "unknown divergence 'kl'"),
        (lambda s, m: divergence("jsd", s, s, m, beta=1.5), "beta must be a number in \\[0, 1\\]"),
        (lambda s, m: divergence("skew_forward_kl", s, s, m, alpha=-0.1), "alpha must be"),
        (lambda s, m: divergence("jsd", s, s, m, beta=math.nan), "beta must be"),
        (lambda s, m: divergence("tvd", s, s, m, beta=0.5), "takes no parameter 'beta'"),
        (lambda s, m: divergence("jsd", s, s, m, alpha=0.5), "takes no parameter 'alpha'"),
        (lambda s, m: divergence("tvd", s, s, m, temperature=0.0), "temperature"),
        (lambda s, m: divergence("tvd", s, s, m.float()), "mask must be bool"),
        (lambda s, m: per_token("tvd", s, s[:, :3]), "student logits"),
        (lambda s, m: sparse_per_token("tvd", s, torch.zeros(2, 2), s[:, :2]), "torch.long"),
        (lambda s, m: sparse_per_token("tvd", s, torch.zeros(2, 9, dtype=torch.long), s.repeat(1, 2)[:, :9]), "k <= V"),
    ],
)
def test_errors_name_the_problem(call, match):
    s, m = rand(2, 5, seed=21), torch.ones(2, dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        call(s, m)
