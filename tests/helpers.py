"""Helpers shared by the tests: tiny model configs, run-folder readers, a crash injector."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TINY_STUDENT = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
    "tie_word_embeddings": True,
}
TINY_TEACHER = {**TINY_STUDENT, "hidden_size": 48, "intermediate_size": 96}


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def student_weights(run_dir) -> dict[str, torch.Tensor]:
    """The exported student's weights of a run directory."""
    return load_file(str(Path(run_dir) / "student" / "model.safetensors"))


def crash_at(monkeypatch, step: int, run) -> None:
    """Call run() and make it crash (KeyboardInterrupt) right after optimizer step `step`
    is logged; the training loop is restored afterwards."""
    import distill.training.loop as train_mod

    real_update = train_mod.Progress.update

    def crash(self, done, loss, tps):
        real_update(self, done, loss, tps)
        if done == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod.Progress, "update", crash)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(train_mod.Progress, "update", real_update)
