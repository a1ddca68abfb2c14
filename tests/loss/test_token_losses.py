import math

import pytest
import torch

from distill.config import ObjectiveConfig
from distill.loss.divergences import divergence
from distill.loss.terms import combine, term_sums
from distill.loss.token_losses import IGNORE_INDEX, cross_entropy


def fkl(s, t, mask, temperature=1.0):
    return divergence("forward_kl", s, t, mask, temperature)


def test_kd_objective_matches_kldivloss_batchmean_on_chapter_example():
    """Batch 4, seq 128, vocab 32000, random logits: alpha * T^2 * KL equals KLDivLoss(batchmean).

    KLDivLoss(batchmean) divides by the first dimension, so tokens are flattened to
    (4 * 128, V): the mean over tokens, which is what our sum / valid-token count is.
    """
    g = torch.Generator().manual_seed(0)
    B, T, V, temp, alpha = 4, 128, 32000, 2.0, 0.5
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    ref_kl = torch.nn.KLDivLoss(reduction="batchmean")(
        torch.log_softmax(student.reshape(-1, V) / temp, -1), torch.softmax(teacher.reshape(-1, V) / temp, -1)
    )
    ref_ce = torch.nn.functional.cross_entropy(student.reshape(-1, V), labels.reshape(-1))
    ref = (1 - alpha) * ref_ce + alpha * temp**2 * ref_kl

    mask = torch.ones(B, T, dtype=torch.bool)
    kl = divergence("forward_kl", student, teacher, mask, temp) / (B * T)
    assert kl.item() == pytest.approx(ref_kl.item(), abs=1e-6)
    ce = cross_entropy(student, labels) / (B * T)
    weights = ObjectiveConfig(alpha=alpha, temperature=temp).term_weights()
    ours = combine({"task_ce": ce, "kd": kl}, *weights)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)


def test_t_squared_is_an_explicit_option():
    assert ObjectiveConfig(alpha=0.25, temperature=4.0).term_weights() == (0.75, 0.25 * 16)
    assert ObjectiveConfig(alpha=0.25, temperature=4.0, t_squared=False).term_weights() == (0.75, 0.25)
    terms = {"task_ce": torch.tensor(2.0), "kd": torch.tensor(3.0)}
    assert combine(terms, 0.75, 0.25).item() == pytest.approx(0.75 * 2 + 0.25 * 3)
    assert combine({"task_ce": torch.tensor(2.0)}, 0.75, 4.0).item() == 2.0  # labels only: CE, unweighted


def test_term_sums_shift_and_mask():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5], [IGNORE_INDEX, 1, 2, IGNORE_INDEX, IGNORE_INDEX]])
    terms = term_sums(s, labels, t, vocab_size=7, temperature=1.0)
    # valid next-token positions: row 0 -> positions 1,2,3; row 1 -> positions 0,1
    idx = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    targets = [3, 4, 5, 1, 2]
    ce = sum(-torch.log_softmax(s[b, p], -1)[y] for (b, p), y in zip(idx, targets))
    kl = sum(
        (torch.softmax(t[b, p], -1) * (torch.log_softmax(t[b, p], -1) - torch.log_softmax(s[b, p], -1))).sum()
        for b, p in idx
    )
    assert terms["task_ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(kl.item(), rel=1e-5)


def test_padded_vocab_is_masked_not_an_error():
    """A teacher whose output layer is padded past the real vocabulary: padded ids are dropped."""
    g = torch.Generator().manual_seed(2)
    s = torch.randn(1, 4, 10, generator=g)
    t_real = torch.randn(1, 4, 10, generator=g)
    t_padded = torch.cat([t_real, torch.full((1, 4, 6), 50.0)], dim=-1)  # huge logits on padding
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 3]])
    a = term_sums(s, labels, t_real, vocab_size=10, temperature=2.0)
    b = term_sums(s, labels, t_padded, vocab_size=10, temperature=2.0)
    assert torch.equal(a["kd"], b["kd"])


def test_kl_properties():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 11, generator=g, dtype=torch.float64)
    y = torch.randn(6, 11, generator=g, dtype=torch.float64)
    mask = torch.ones(6, dtype=torch.bool)
    assert fkl(x, x, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert fkl(x, y, mask).item() > 0
    assert fkl(x, y, torch.zeros(6, dtype=torch.bool)).item() == 0.0
    # -inf teacher entries (masked ids) give finite values and gradients
    y[:, 0] = -math.inf
    x.requires_grad_(True)
    out = fkl(x, y, mask, temperature=0.5)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()


def test_kl_gradcheck_float64():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([True, False, True])
    assert torch.autograd.gradcheck(lambda a: fkl(a, y, mask, 1.7), (x,))


def test_bf16_inputs_are_computed_in_fp32():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 50, generator=g), torch.randn(8, 50, generator=g)
    mask = torch.ones(8, dtype=torch.bool)
    out = fkl(x.bfloat16(), y.bfloat16(), mask, 2.0)
    assert out.dtype == torch.float32
    ref = fkl(x.bfloat16().float(), y.bfloat16().float(), mask, 2.0)
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
