"""Fixtures shared by the tests; plain helpers live in helpers.py."""

import copy

import pytest

from helpers import TINY_STUDENT, TINY_TEACHER

pytest_plugins = ["browser"]  # the headless-chromium fixtures: browser, open_page


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
