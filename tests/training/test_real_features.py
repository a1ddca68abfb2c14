"""Layer drop and feature KD on the real packaged teacher (SmolLM2-135M-Instruct), real text."""

import json

import pytest
import torch
from test_real_kd import SMOL, prose_jsonl
from transformers import AutoModelForCausalLM

from distill.config import build_config
from distill.models.loading import load_causal_lm
from distill.models.students import make_student
from distill.training.features import load_projectors
from distill.training.loop import train

from helpers import read_metrics

pytestmark = pytest.mark.real


def test_layer_drop_student_of_smollm2_then_feature_kd(tmp_path):
    record = make_student(SMOL, tmp_path / "student", layers=3)
    assert record["kept_layers"] == [0, 15, 29] and record["init"] == "layer_drop"
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    teacher = load_causal_lm(SMOL)
    for new, old in enumerate(record["kept_layers"]):
        torch.testing.assert_close(
            student.model.layers[new].self_attn.q_proj.weight, teacher.model.layers[old].self_attn.q_proj.weight, rtol=0, atol=0
        )
    del student, teacher

    tree = {
        "student": {"name": str(tmp_path / "student")},
        "teacher": {"name": SMOL},
        "data": {"source": str(prose_jsonl(tmp_path / "train.jsonl", 16)), "eval_source": str(tmp_path / "train.jsonl"),
                 "max_length": 256, "n_test": 4},  # fmt: skip
        "objective": {"alpha": 0.5, "temperature": 1.0},
        "features": {"weight": 1.0, "loss": "ln_mse", "probe_examples": 4},
        "train": {"steps": 2, "micro_batch_size": 2, "lr": 1e-4, "warmup_steps": 1},
        "out_dir": str(tmp_path / "run"),
    }
    summary = train(build_config(tree), show_progress=False)
    assert summary["fused_loss"] and summary["feature_pairs"] == 3
    metrics = read_metrics(tmp_path / "run")
    assert all(torch.isfinite(torch.tensor([m["loss"], m["kd"], m["feature"]])).all() for m in metrics)
    records = [json.loads(x) for x in (tmp_path / "run" / "alignment.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2]
    # uniform map: student layers 0, 1, 2 <-> teacher layers 9, 19, 29
    assert [(p["student"], p["teacher"]) for p in records[0]["pairs"]] == [(1, 10), (2, 20), (3, 30)]
    assert all(0 <= p["cka"] <= 1 for r in records for p in r["pairs"])
    projectors = load_projectors(tmp_path / "run")
    assert projectors.projs[0].weight.shape == (576, 576)
