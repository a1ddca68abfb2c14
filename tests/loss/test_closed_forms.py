"""Closed-form values and student-logit gradients vs autograd through `divergences.per_token`."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_divergences import CONFIGS as BASE_CONFIGS
from test_divergences import config_ids

from distill.loss.closed_forms import per_token_and_grad
from distill.loss.divergences import per_token
from distill.loss.registry import DIVERGENCES

INF = math.inf
# the divergence configurations of test_divergences (every registered name), plus a
# near-endpoint JSD and another skew
CONFIGS = BASE_CONFIGS + [("jsd", {"beta": 1e-3}), ("skew_reverse_kl", {"alpha": 0.3})]
SPARSE_CONFIGS = [(n, p) for n, p in CONFIGS if DIVERGENCES[n].sparse]
IDS, SPARSE_IDS = config_ids(CONFIGS), config_ids(SPARSE_CONFIGS)


def autograd_reference(name, s, t, temperature, params):
    exact = torch.float64 if torch.float64 in (s.dtype, t.dtype) else torch.float32
    s = s.detach().to(exact).requires_grad_(True)  # the closed form upcasts first, so compare there
    values = per_token(name, s, t.to(exact), temperature, **params)
    (grad,) = torch.autograd.grad(values.sum(), s)
    return values.detach(), grad


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=IDS)
def test_matches_autograd_float64(name, params, temperature):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, 11, generator=g, dtype=torch.float64) * 3
    t = torch.randn(6, 11, generator=g, dtype=torch.float64) * 3
    t[0, 2] = t[3, 5] = -INF  # teacher rules out ids (the student still covers them: skip reverse-type)
    s[3, 5] = -INF  # the student rules out one of them too
    if name in ("reverse_kl",) or (name, params) in (("jsd", {"beta": 1.0}), ("skew_reverse_kl", {"alpha": 0.0})):
        t[0, 2] = 0.0  # reverse KL is +inf where only the teacher rules an id out
    s_before = s.clone()
    values, grad = per_token_and_grad(name, s, t, temperature, **params)
    ref_values, ref_grad = autograd_reference(name, s, t, temperature, params)
    assert torch.equal(s, s_before)  # inputs untouched
    assert values.dtype == grad.dtype == torch.float64
    torch.testing.assert_close(values, ref_values, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert grad[3, 5] == 0.0  # no mass, no gradient


def test_gradcheck_of_the_closed_form_value():
    """The gradient really is the derivative of the value (finite differences, float64)."""
    g = torch.Generator().manual_seed(2)
    t = torch.randn(3, 5, generator=g, dtype=torch.float64)
    for name, params in CONFIGS:
        s = torch.randn(3, 5, generator=g, dtype=torch.float64)
        _, grad = per_token_and_grad(name, s, t, 1.3, **params)
        eps = 1e-6
        for i, j in [(0, 0), (1, 3), (2, 4)]:
            up, down = s.clone(), s.clone()
            up[i, j] += eps
            down[i, j] -= eps
            fd = (per_token_and_grad(name, up, t, 1.3, **params)[0].sum() - per_token_and_grad(name, down, t, 1.3, **params)[0].sum()) / (2 * eps)
            assert abs(fd.item() - grad[i, j].item()) < 1e-6, (name, params, i, j)


EXTREME = st.one_of(st.sampled_from([1e4, -1e4, 9999.5, -9999.0, 0.0]), st.floats(-1e4, 1e4))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(2, 6),
    st.data(),
    st.floats(0.05, 20.0),
    st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_extremes_match_autograd_and_never_nan(n, v, data, temperature, dtype):
    flat = st.lists(EXTREME, min_size=n * v, max_size=n * v)
    s = torch.tensor(data.draw(flat)).view(n, v).to(dtype)
    t = torch.tensor(data.draw(flat)).view(n, v).to(dtype)
    exact = torch.float64 if dtype == torch.float64 else torch.float32
    for name, params in CONFIGS:
        values, grad = per_token_and_grad(name, s, t, temperature, **params)
        ref_values, ref_grad = autograd_reference(name, s, t, temperature, params)
        assert values.dtype == grad.dtype == exact
        assert torch.isfinite(values).all() and torch.isfinite(grad).all(), (name, params)
        # fp32 rounding is relative to the largest entry (reverse KL reaches 2e4 here)
        torch.testing.assert_close(values, ref_values, rtol=1e-4, atol=1e-4 * max(1.0, ref_values.abs().max().item()))
        # A gradient q (a - sum q a) near 0 is a difference of terms as large as the log-ratio
        # a (up to 2e4 / T here): both sides carry rounding of eps * |a| there (autograd's own
        # fp32 gradient is off by 4e-4 from the exact 0 at +-1e4 logits).
        cancel = 4 * torch.finfo(exact).eps * (s.float().abs().max() + t.float().abs().max()).item() / temperature
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4 * max(1.0, ref_grad.abs().max().item()) + cancel)


def test_reverse_kl_true_infinity():
    s = torch.tensor([[0.0, 0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0, -INF]])
    values, grad = per_token_and_grad("reverse_kl", s, t)
    assert values.item() == INF  # the student covers an id the teacher rules out
    # skew reverse KL stays finite there (the mixture keeps alpha * q)
    values, grad = per_token_and_grad("skew_reverse_kl", s, t, alpha=0.1)
    assert torch.isfinite(values).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: per_token_and_grad("kl", torch.zeros(2, 3), torch.zeros(2, 3)), "unknown divergence 'kl'"),
        (lambda: per_token_and_grad("jsd", torch.zeros(2, 3), torch.zeros(2, 3), beta=2.0), "beta must be a number"),
        (lambda: per_token_and_grad("tvd", torch.zeros(2, 3), torch.zeros(2, 4)), r"\(2, 3\) and \(2, 4\)"),
        (lambda: per_token_and_grad("tvd", torch.zeros(2, 3), torch.zeros(2, 3), 0.0), "temperature"),
    ],
)
def test_errors_name_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("temperature", [0.7, 2.0])
@pytest.mark.parametrize(("name", "params"), SPARSE_CONFIGS, ids=SPARSE_IDS)
def test_sparse_matches_autograd(name, params, temperature):
    from distill.loss.closed_forms import log_softmax_at, sparse_value_and_grad
    from distill.loss.divergences import sparse_per_token

    g = torch.Generator().manual_seed(3)
    V, k = 13, 4
    s = torch.randn(5, V, generator=g, dtype=torch.float64) * 3
    t = torch.randn(5, V, generator=g, dtype=torch.float64) * 3
    t[:, 1] += 5.0  # a confident teacher: small leftovers
    log_p = torch.log_softmax(t / temperature, -1)
    top = log_p.topk(k, -1)
    rest = log_p.scatter(-1, top.indices, -INF).logsumexp(-1)
    s_leaf = s.clone().requires_grad_(True)
    ref = sparse_per_token(name, s_leaf, top.indices, top.values, temperature, teacher_rest=rest, **params)
    (ref_grad,) = torch.autograd.grad(ref.sum(), s_leaf)
    log_q = log_softmax_at(s.clone(), temperature)
    values, grad = sparse_value_and_grad(name, log_q, top.indices, top.values, rest, temperature, **params)
    torch.testing.assert_close(values, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    # k = V: no rest bucket, the dense values
    full = log_p.topk(V, -1)
    values, grad = sparse_value_and_grad(
        name, log_softmax_at(s.clone(), temperature), full.indices, full.values, torch.full((5,), -INF, dtype=s.dtype),
        temperature, **params,
    )  # fmt: skip
    dense_values, dense_grad = per_token_and_grad(name, s, t, temperature, **params)
    torch.testing.assert_close(values, dense_values, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, dense_grad, rtol=1e-8, atol=1e-12)
