import copy
import json
from pathlib import Path

import pytest

pytest_plugins = ["browser"]  # the headless-chromium fixtures: browser, open_page

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


@pytest.fixture
def tiny_tree(tmp_path) -> dict:
    """A complete run config as a dict: tiny random llama teacher and student, built-in task."""
    return copy.deepcopy(
        {
            "student": {"config": TINY_STUDENT, "tokenizer": "builtin"},
            "teacher": {"config": TINY_TEACHER, "tokenizer": "builtin"},
            "data": {"n_train": 128, "n_test": 8},
            "objective": {"alpha": 0.5, "temperature": 2.0},
            "train": {"steps": 4, "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 1},
            "eval": {"max_new_tokens": 8, "batch_size": 8},
            "out_dir": str(tmp_path / "run"),
        }
    )


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


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
