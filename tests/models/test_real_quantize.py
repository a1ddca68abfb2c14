"""Post-training quantization of the packaged real model (SmolLM2-135M-Instruct, trained):
int8 weight-only moves its held-out forward KL to the full-precision model by at most 0.02
nats/token, int4 costs more than int8, and the quantized folder is smaller on disk."""

import pytest

from distill.models.loading import load_causal_lm, load_tokenizer
from distill.models.quantize import Scheme
from distill.models.quantized_io import quantize_folder
from distill.pipeline.demo_real import SMOL, heldout_paragraphs, pack, text_scores

pytestmark = pytest.mark.real
pytest.importorskip("torchao")


def test_int8_of_smollm2_keeps_forward_kl_and_int4_costs_more(tmp_path):
    teacher, tokenizer = load_causal_lm(SMOL), load_tokenizer(SMOL)
    teacher.save_pretrained(tmp_path / "fp32")
    tokenizer.save_pretrained(tmp_path / "fp32")
    r8 = quantize_folder(tmp_path / "fp32", tmp_path / "int8", Scheme("int8"))
    r4 = quantize_folder(tmp_path / "fp32", tmp_path / "int4", Scheme("int4", 32))
    assert r4["weights_bytes"] < r8["weights_bytes"] < 0.5 * r8["fp_weights_bytes"]
    texts = pack(heldout_paragraphs(set()), tokenizer, 128)[:8]
    models = {name: load_causal_lm(str(tmp_path / name)) for name in ("int8", "int4")}
    sums = text_scores(teacher, models, tokenizer, texts, 128, batch=4)
    kl = {name: s["kl"] / s["count"] for name, s in sums.items()}  # nats per token
    assert sums["int8"]["count"] > 500
    assert 0 < kl["int8"] <= 0.02, kl
    assert kl["int4"] > kl["int8"], kl
