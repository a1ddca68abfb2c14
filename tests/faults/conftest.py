"""Fixtures of the fault tests: the real `distill` command run in this process (fast: no
interpreter start, no torch import per call) and a tiny run config."""

import copy
import sys
from dataclasses import dataclass

import pytest
import yaml

from helpers import TINY_STUDENT, TINY_TEACHER


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """cli(*args) -> Result: `distill ARGS` through distill.cli.main, exit code and output.
    An exception main() lets through (a traceback) fails the test with that traceback."""
    from distill import cli as command

    def run(*args) -> Result:
        capsys.readouterr()
        old = sys.argv
        sys.argv = ["distill", *map(str, args)]
        code = 0
        try:
            command.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        finally:
            sys.argv = old
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


@pytest.fixture
def tree(tmp_path) -> dict:
    """A complete tiny run: random llama teacher and student, the built-in task, 4 steps."""
    return copy.deepcopy(
        {
            "student": {"config": TINY_STUDENT, "tokenizer": "builtin"},
            "teacher": {"config": TINY_TEACHER, "tokenizer": "builtin"},
            "data": {"n_train": 32, "n_test": 4},
            "train": {"steps": 4, "micro_batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2},
            "eval": {"max_new_tokens": 2, "batch_size": 4},
            "out_dir": str(tmp_path / "run"),
        }
    )


@pytest.fixture
def write_yaml(tmp_path):
    def write(tree: dict, name: str = "run.yaml"):
        path = tmp_path / name
        path.write_text(yaml.safe_dump(tree))
        return path

    return write
