"""The quantized benchmark's own part (benchmarks/quantized.py): which folders a seed's rows
are, each quantized once. A tiny random llama stands for the recipe's student."""

from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from distill.data.tasks.tokenizer import chain_tokenizer

from helpers import load_benchmark

quantized = load_benchmark("quantized")


def _student(folder: Path) -> None:
    tokenizer = chain_tokenizer()
    tokenizer.save_pretrained(folder)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(folder)


def test_a_seed_is_its_fp32_student_and_each_quantization_of_it_made_once(tmp_path):
    _student(tmp_path / "runs" / "depth-recipe-frozen-s1-200" / "student")
    folders = quantized.folders_of(tmp_path, "@frozen", None, 1, 200)
    assert list(folders) == ["fp32", "int8 post-training", "int4 post-training"]
    assert folders["fp32"] == tmp_path / "runs" / "depth-recipe-frozen-s1-200" / "student"
    made = {k: (v / "quant.json").stat().st_mtime_ns for k, v in folders.items() if k != "fp32"}
    assert quantized.folders_of(tmp_path, "@frozen", None, 1, 200) == folders  # read back, not redone
    assert made == {k: (v / "quant.json").stat().st_mtime_ns for k, v in folders.items() if k != "fp32"}


def test_missing_runs_are_named(tmp_path):
    with pytest.raises(SystemExit, match="depth-recipe-frozen-s0-200/student not found"):
        quantized.folders_of(tmp_path, "@frozen", None, 0, 200)
    _student(tmp_path / "runs" / "depth-recipe-frozen-s0-200" / "student")
    with pytest.raises(SystemExit, match="depth-recipe-qat-s0-200/student-int4 not found"):
        quantized.folders_of(tmp_path, "@frozen", "@qat", 0, 200)
