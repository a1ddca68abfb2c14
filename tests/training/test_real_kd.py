"""A few logit-KD steps against the real packaged teacher (SmolLM2-135M-Instruct) on real text."""

import json
from pathlib import Path
from pydoc_data.topics import topics

import pytest

from distill.config import build_config
from distill.training.loop import train

from helpers import read_metrics

pytestmark = pytest.mark.real
SMOL = "packaged:smollm2-135m-instruct"


def prose_jsonl(path: Path, n: int) -> Path:
    """Real English from CPython's language reference, as completion-only rows."""
    rows = []
    for name in sorted(topics):
        for para in topics[name].split("\n\n"):
            para = " ".join(para.split())
            if 80 < len(para) < 300 and not para.startswith(("*", "|", ">>>")):
                rows.append({"text": para})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    return path


def test_kd_steps_against_real_teacher_with_padded_student_vocab(tmp_path):
    data = prose_jsonl(tmp_path / "prose.jsonl", 64)
    tree = {
        "teacher": {"name": SMOL},
        # The student shares SmolLM2's tokenizer but its output layer is padded to 49216
        # rows (a multiple of 64, as training stacks do): the padded ids are masked.
        "student": {
            "tokenizer": SMOL,
            "config": {
                "model_type": "llama",
                "vocab_size": 49216,
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "intermediate_size": 128,
                "max_position_embeddings": 256,
                "tie_word_embeddings": True,
            },
        },
        "data": {"source": str(data), "max_length": 128},
        "objective": {"alpha": 1.0, "temperature": 1.0},
        "train": {"steps": 8, "micro_batch_size": 4, "lr": 1e-2, "warmup_steps": 1},
        "out_dir": str(tmp_path / "run"),
    }
    summary = train(build_config(tree), show_progress=False)
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 8 and summary["tokens"] > 0
    kd = [m["kd"] for m in metrics]
    assert all(k == k and k > 0 for k in kd)
    assert sum(kd[-2:]) / 2 < 0.9 * sum(kd[:2]) / 2  # the student moves toward the teacher
    assert (tmp_path / "run" / "student" / "tokenizer.json").exists()
