import pytest
import torch
import torch.nn.functional as F
from test_divergences import config_ids

from distill.loss.divergences import divergence, sparse_divergence
from distill.loss.fused import fused_kd_loss, fused_sparse_kd_loss
from distill.loss.registry import DIVERGENCES

N, HS, HT, V = 37, 16, 24, 101
# Every registered divergence, at its defaults unless listed here (interior values only:
# the endpoints are the plain KLs, tested in test_divergences and test_closed_forms).
PARAM_CASES = {"jsd": [{"beta": 0.1}, {"beta": 0.5}, {"beta": 0.9}]}
CONFIGS = [(name, params) for name, spec in DIVERGENCES.items() for params in PARAM_CASES.get(name, [spec.defaults()])]
SPARSE_CONFIGS = [(n, p) for n, p in CONFIGS if DIVERGENCES[n].sparse]
IDS, SPARSE_IDS = config_ids(CONFIGS), config_ids(SPARSE_CONFIGS)


def make(dtype=torch.float32, seed=0, n=N, hs=HS, ht=HT, v=V, vt=None):
    g = torch.Generator().manual_seed(seed)
    vt = v if vt is None else vt
    t = {
        "hs": torch.randn(n, hs, generator=g),
        "ws": torch.randn(v, hs, generator=g) * 0.5,
        "bs": torch.randn(v, generator=g) * 0.1,
        "ht": torch.randn(n, ht, generator=g),
        "wt": torch.randn(vt, ht, generator=g) * 0.5,
        "bt": torch.randn(vt, generator=g) * 0.1,
    }
    t = {k: x.to(dtype) for k, x in t.items()}
    mask = torch.rand(n, generator=g) > 0.3
    labels = torch.randint(0, v, (n,), generator=g)
    return t, mask, labels


def leaves(t, dtype=None):
    out = {k: (x.to(dtype) if dtype else x).detach().clone() for k, x in t.items()}
    for k in ("hs", "ws", "bs"):
        out[k].requires_grad_(True)
    return out


def naive(t, mask, name, params, temperature=1.0, labels=None, ce=0.0):
    s = t["hs"] @ t["ws"].T + t["bs"]
    te = (t["ht"] @ t["wt"].T + t["bt"]).detach()
    loss = divergence(name, s, te, mask, temperature, **params)
    if ce:
        loss = loss + ce * F.cross_entropy(s[mask].float(), labels[mask], reduction="sum")
    loss.backward()
    return loss.detach(), [t[k].grad for k in ("hs", "ws", "bs")]


def fused(t, mask, name, params, chunk=8, **kw):
    loss = fused_kd_loss(
        t["hs"], t["ws"], t["ht"], t["wt"], mask, divergence=name,
        student_bias=t["bs"], teacher_bias=t["bt"], chunk_size=chunk, **kw, **params,
    )  # fmt: skip
    loss.backward()
    return loss.detach(), [t[k].grad for k in ("hs", "ws", "bs")]


def close(a, b, rtol):
    scale = b.abs().max().clamp_min(1e-12)
    assert torch.isfinite(a).all()
    assert (a - b).abs().max() <= rtol * scale, ((a - b).abs().max(), scale)


@pytest.mark.parametrize("chunk", [8, 1000])
@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=IDS)
def test_parity_fp32(name, params, chunk):
    t, mask, _ = make()
    l_ref, g_ref = naive(leaves(t), mask, name, params, temperature=2.0)
    l_f, g_f = fused(leaves(t), mask, name, params, chunk=chunk, temperature=2.0)
    close(l_f, l_ref, 1e-5)
    for a, b in zip(g_f, g_ref, strict=True):
        close(a, b, 1e-5)


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=IDS)
def test_bf16_no_worse_than_naive(name, params):
    t, mask, _ = make(torch.bfloat16, seed=1)
    _, g_true = naive(leaves(t, torch.float32), mask, name, params)
    _, g_naive = naive(leaves(t), mask, name, params)
    l_f, g_f = fused(leaves(t), mask, name, params)
    assert l_f.dtype == torch.float32
    for a, b, ref in zip(g_f, g_naive, g_true, strict=True):
        assert a.dtype == torch.bfloat16
        err_f = (a.float() - ref).abs()
        err_n = (b.float() - ref).abs()
        assert (err_f <= err_n + 1e-2).all(), (err_f - err_n).max()


def test_hard_ce_weight():
    t, mask, labels = make(seed=2)
    l0, _ = fused(leaves(t), mask, "forward_kl", {})
    l_default, _ = fused(leaves(t), mask, "forward_kl", {}, labels=labels)
    assert torch.equal(l_default, l0)  # default weight 0 adds nothing (labels all valid here)
    ref = leaves(t)
    l_ref, g_ref = naive(ref, mask, "forward_kl", {}, labels=labels, ce=0.3)
    l_f, g_f = fused(leaves(t), mask, "forward_kl", {}, labels=labels, hard_ce_weight=0.3)
    s = t["hs"] @ t["ws"].T + t["bs"]
    ce = F.cross_entropy(s[mask], labels[mask], reduction="sum")
    close(l_f - l0, 0.3 * ce, 1e-5)
    close(l_f, l_ref, 1e-5)
    for a, b in zip(g_f, g_ref, strict=True):
        close(a, b, 1e-5)


def test_labels_ignore_index_masks():
    t, mask, labels = make(seed=3)
    labels = torch.where(mask, labels, -100)
    l_mask, _ = fused(leaves(t), mask, "jsd", {"beta": 0.5})
    l_lab = fused_kd_loss(
        *(leaves(t)[k] for k in ("hs", "ws", "ht", "wt")), labels=labels, divergence="jsd", beta=0.5,
        student_bias=t["bs"], teacher_bias=t["bt"], chunk_size=8,
    )  # fmt: skip
    close(l_lab.detach(), l_mask, 1e-6)


def test_padded_vocab():
    t, mask, _ = make(seed=4, vt=V + 27)
    pad_s = {**t, "ws": torch.cat([t["ws"], torch.randn(13, HS)]), "bs": torch.cat([t["bs"], torch.randn(13)])}
    padded = leaves(pad_s)
    l_p, g_p = fused(padded, mask, "jsd", {"beta": 0.5}, vocab_size=V)
    plain = leaves({**t, "wt": t["wt"][:V], "bt": t["bt"][:V]})
    l_u, g_u = fused(plain, mask, "jsd", {"beta": 0.5})
    close(l_p, l_u, 1e-6)
    close(g_p[0], g_u[0], 1e-6)
    close(g_p[1][:V], g_u[1], 1e-6)
    close(g_p[2][:V], g_u[2], 1e-6)
    assert (g_p[1][V:] == 0).all() and (g_p[2][V:] == 0).all()
    with pytest.raises(ValueError, match="vocab_size"):
        fused(leaves(t), mask, "forward_kl", {})


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=IDS)
def test_fully_masked(name, params):
    t, _, _ = make(seed=5)
    l_f, g_f = fused(leaves(t), torch.zeros(N, dtype=torch.bool), name, params)
    assert l_f.item() == 0.0
    for g in g_f:
        assert (g == 0).all()


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=IDS)
def test_chunk_size_invariance(name, params):
    t, mask, _ = make(seed=6)
    l8, g8 = fused(leaves(t), mask, name, params, chunk=8)
    l_big, g_big = fused(leaves(t), mask, name, params, chunk=1000)
    close(l8, l_big, 1e-6)
    for a, b in zip(g8, g_big, strict=True):
        close(a, b, 1e-6)


@pytest.mark.parametrize(("name", "params"), [("forward_kl", {}), ("jsd", {"beta": 0.3})])
def test_gradcheck_float64(name, params):
    t, mask, _ = make(torch.float64, seed=7, n=5, hs=3, ht=4, v=7)
    mask[0] = False

    def f(hs, ws, bs):
        return fused_kd_loss(
            hs, ws, t["ht"], t["wt"], mask, divergence=name, temperature=1.5,
            student_bias=bs, teacher_bias=t["bt"], chunk_size=2, **params,
        )  # fmt: skip

    inputs = tuple(t[k].clone().requires_grad_(True) for k in ("hs", "ws", "bs"))
    assert torch.autograd.gradcheck(f, inputs)


def test_no_bias_and_frozen_weight():
    t, mask, _ = make(seed=8)
    a = leaves(t)
    a["ws"].requires_grad_(False)
    loss = fused_kd_loss(a["hs"], a["ws"], a["ht"], a["wt"], mask, chunk_size=8)
    loss.backward()
    b = leaves(t)
    ref = divergence("forward_kl", b["hs"] @ b["ws"].T, b["ht"] @ b["wt"].T, mask)
    ref.backward()
    close(loss.detach(), ref.detach(), 1e-5)
    close(a["hs"].grad, b["hs"].grad, 1e-5)
    assert a["ws"].grad is None


def test_grad_output_scaling():
    t, mask, _ = make(seed=9)
    a, b = leaves(t), leaves(t)
    fused_kd_loss(a["hs"], a["ws"], a["ht"], a["wt"], mask, chunk_size=8).backward()
    (fused_kd_loss(b["hs"], b["ws"], b["ht"], b["wt"], mask, chunk_size=8) * 2.5).backward()
    close(b["hs"].grad, 2.5 * a["hs"].grad, 1e-6)
    close(b["ws"].grad, 2.5 * a["ws"].grad, 1e-6)


# --- the sparse (cached top-k) teacher ------------------------------------------------------


def sparse_teacher(t, k, temperature):
    """Top-k ids, log-probs at T and the log leftover of the dense teacher in `t`."""
    log_p = torch.log_softmax((t["ht"] @ t["wt"].T + t["bt"]).double() / temperature, -1)
    top = log_p.topk(k, -1)
    rest = log_p.scatter(-1, top.indices, -torch.inf).logsumexp(-1)
    return top.indices, top.values.float(), rest.float()


@pytest.mark.parametrize("k", [5, V])
@pytest.mark.parametrize(("name", "params"), SPARSE_CONFIGS, ids=SPARSE_IDS)
def test_sparse_parity_fp32(name, params, k):
    t, mask, labels = make(seed=10)
    ids, lp, rest = sparse_teacher(t, k, 2.0)
    ref = leaves(t)
    s = ref["hs"] @ ref["ws"].T + ref["bs"]
    l_ref = sparse_divergence(name, s, ids, lp, mask, 2.0, rest, **params) * 0.7
    l_ref = l_ref + 0.2 * F.cross_entropy(s[mask], labels[mask], reduction="sum")
    l_ref.backward()
    a = leaves(t)
    l_f, terms = fused_sparse_kd_loss(
        a["hs"], a["ws"], ids, lp, rest, mask, labels, divergence=name, temperature=2.0, student_bias=a["bs"],
        hard_ce_weight=0.2, divergence_weight=0.7, chunk_size=8, return_terms=True, **params,
    )  # fmt: skip
    l_f.backward()
    close(l_f.detach(), l_ref.detach(), 1e-5)
    for key in ("hs", "ws", "bs"):
        close(a[key].grad, ref[key].grad, 1e-5)
    close(terms[0], sparse_divergence(name, s.detach(), ids, lp, mask, 2.0, rest, **params), 1e-5)


def test_sparse_gradcheck_padded_and_masked():
    t, mask, labels = make(torch.float64, seed=11, n=6, hs=3, ht=4, v=9)
    mask[:] = True
    ids, lp, rest = sparse_teacher(t, 3, 1.3)
    labels[1] = -100  # ignore_index masks that token
    pad_w = torch.cat([t["ws"], torch.randn(4, 3, dtype=torch.float64)])

    def f(hs, ws):
        return fused_sparse_kd_loss(
            hs, ws, ids, lp.double(), rest.double(), labels=labels, divergence="jsd", beta=0.4,
            temperature=1.3, vocab_size=9, hard_ce_weight=0.5, chunk_size=4,
        )  # fmt: skip

    inputs = (t["hs"].clone().requires_grad_(True), pad_w.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(f, inputs)
    loss = f(*inputs)
    loss.backward()
    assert (inputs[1].grad[9:] == 0).all()  # padded rows get no gradient
    zero = fused_sparse_kd_loss(t["hs"], t["ws"], ids, lp, rest, torch.zeros(6, dtype=torch.bool))
    assert zero.item() == 0.0
    with pytest.raises(ValueError, match=r"teacher_rest \(N,\)"):
        fused_sparse_kd_loss(t["hs"], t["ws"], ids, lp, rest[:2], mask)
