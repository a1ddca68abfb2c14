"""A divergence added through the registry alone works everywhere: config, closed form, sparse
path, and training on the fused and the naive path."""

import copy

import pytest
import torch

from distill.config import build_config
from distill.loss.closed_forms import log_softmax_at, per_token_and_grad, sparse_value_and_grad
from distill.loss.divergences import per_token, sparse_per_token
from distill.loss.registry import DivergenceSpec, register_divergence, unregister_divergence
from distill.training.loop import train

from helpers import read_metrics

NAME = "sym_kl"
CALLS = {"value": 0, "value_and_grad": 0}


def sym_kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """Symmetric KL 0.5 * (KL(p || q) + KL(q || p)) = 0.5 * sum (q - p)(log q - log p), (..., K) -> (...)."""
    CALLS["value"] += 1
    return 0.5 * ((log_q.exp() - log_p.exp()) * (log_q - log_p)).sum(-1)


def sym_kl_value_and_grad(log_q: torch.Tensor, log_p: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Its value and student-logit gradient: q a with a = dD/dq = 0.5 (log q - log p + 1 - p / q),
    through the softmax Jacobian q (a - sum q a) / T (the constant 1 cancels)."""
    CALLS["value_and_grad"] += 1
    q, p = log_q.exp(), log_p.exp()  # (c, V)
    log_ratio = log_q - log_p  # (c, V)
    value = 0.5 * ((q - p) * log_ratio).sum(-1)  # (c,)
    qa = 0.5 * (q * log_ratio - p)  # (c, V)
    return value, (qa - q * qa.sum(-1, keepdim=True)) / temperature


@pytest.fixture
def registered():
    """sym_kl in the registry for one test, removed afterwards so other tests never see it."""
    spec = register_divergence(DivergenceSpec(NAME, sym_kl, sym_kl_value_and_grad, summary="symmetric KL"))
    CALLS.update(value=0, value_and_grad=0)
    yield spec
    unregister_divergence(NAME)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.5])
def test_closed_form_matches_autograd(registered, temperature):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 11, generator=g, dtype=torch.float64) * 3
    t = torch.randn(5, 11, generator=g, dtype=torch.float64) * 3
    s_leaf = s.clone().requires_grad_(True)
    ref = per_token(NAME, s_leaf, t, temperature)
    (ref_grad,) = torch.autograd.grad(ref.sum(), s_leaf)
    values, grad = per_token_and_grad(NAME, s, t, temperature)
    torch.testing.assert_close(values, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    # the sparse (top-k + leftover bucket) path, generic over registered divergences
    log_p = torch.log_softmax(t / temperature, -1)
    top = log_p.topk(4, -1)
    rest = log_p.scatter(-1, top.indices, -torch.inf).logsumexp(-1)  # (5,)
    s_leaf = s.clone().requires_grad_(True)
    ref = sparse_per_token(NAME, s_leaf, top.indices, top.values, temperature, teacher_rest=rest)
    (ref_grad,) = torch.autograd.grad(ref.sum(), s_leaf)
    values, grad = sparse_value_and_grad(NAME, log_softmax_at(s.clone(), temperature), top.indices, top.values, rest, temperature)
    torch.testing.assert_close(values, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_trains_on_the_fused_and_the_naive_path(registered, tiny_tree, tmp_path):
    tiny_tree["objective"]["divergence"] = NAME
    runs = {}
    for fused in (False, True):
        tree = copy.deepcopy(tiny_tree)
        tree["objective"]["fused"] = fused
        tree["out_dir"] = str(tmp_path / f"fused-{fused}")
        cfg = build_config(tree)
        assert cfg.objective.divergence == NAME and cfg.objective.divergence_params() == {}
        before = dict(CALLS)
        train(cfg, show_progress=False)
        # the naive path computes the per-token value, the fused path the closed form
        key = "value_and_grad" if fused else "value"
        assert CALLS[key] > before[key], (fused, CALLS)
        runs[fused] = read_metrics(tree["out_dir"])
    naive, fused = runs[False], runs[True]
    assert len(naive) == len(fused) == tiny_tree["train"]["steps"]
    for x, y in zip(naive, fused, strict=True):
        assert x["kd"] > 0
        for k in ("loss", "task_ce", "kd"):
            assert y[k] == pytest.approx(x[k], abs=1e-5, rel=1e-5), (x["step"], k)
    assert naive[-1]["loss"] < naive[0]["loss"]
