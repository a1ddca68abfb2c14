"""A fuzzer over run configs and JSONL rows: whatever the input, `distill` ends with an exit
code and at most one "error:" line, never a traceback.

Configs go through the real `distill train` command (YAML reading, overrides, validation,
the whole of setup: models, data, teacher, run folder) and stop before the first optimizer
step; rows go through `distill curate`, `distill generate` (reading the prompts; the server
is a closed port) and `distill train` on them as data. The default budget runs in well under
a minute; DISTILL_FUZZ_EXAMPLES=1000 searches longer. Sizes that legitimately take long
(rows generated, model widths) are drawn small: large ones are slow runs, not faults; the
model hub is offline (a name is looked up on disk only). What it found so far is pinned as
plain tests: `train.seed=-1` (test_config_errors) and text rows that all fall in the
held-out split (test_hostile_files).
"""

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Literal

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from distill.config import RunConfig

from helpers import TINY_STUDENT, TINY_TEACHER

EXAMPLES = int(os.environ.get("DISTILL_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)

BASE = {
    "student": {"config": TINY_STUDENT, "tokenizer": "builtin"},
    "teacher": {"config": TINY_TEACHER, "tokenizer": "builtin"},
    "data": {"n_train": 16, "n_test": 4},
    "train": {"steps": 2, "micro_batch_size": 4},
    "eval": {"max_new_tokens": 2, "batch_size": 4},
}


def _leaves(model, prefix: str = "") -> dict:
    """Every leaf key of the config schema -> its annotation (out_dir and gates left out)."""
    from pydantic import BaseModel

    out = {}
    for name, field in model.model_fields.items():
        key, ann = f"{prefix}{name}", field.annotation
        sections = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if key in ("out_dir", "gates"):
            continue
        if sections:
            out[key] = ann  # the whole section replaced
            out.update(_leaves(sections[0], key + "."))
        else:
            out[key] = ann
    return out


def _plausible(ann) -> st.SearchStrategy:
    """Values of the annotation's kind, small: most keep the config valid, so setup runs."""
    args = getattr(ann, "__args__", ())
    if getattr(ann, "__origin__", None) is Literal:
        return st.sampled_from(args)
    if args:  # a union: any of its members
        return st.one_of([_plausible(a) for a in args])
    return {
        int: st.integers(0, 8), float: st.floats(0, 1), bool: st.booleans(), type(None): st.none(),
        str: st.sampled_from(["builtin:chain", "builtin:grammar", "jsd", "tvd", "auto", "regex:#(\\d)", "x"]),
    }.get(ann, st.none())  # fmt: skip


SCHEMA = _leaves(RunConfig)
# Keys the schema does not list: inside an inline model config, and unknown ones.
EXTRA = ["student.config.hidden_act", "student.config.rope_theta", "teacher.config.num_hidden_layers", "train.stepz", "x.y"]
# Sizes that are legitimately slow when large (rows generated, models allocated): drawn small.
SMALL = {"data.n_train", "data.n_test", "features.probe_examples", "features.probe_tokens", "features.mlp_hidden",
         "student.config.hidden_size", "teacher.config.num_hidden_layers", "on_policy.rollout_batch_size"}  # fmt: skip

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["builtin:nope", "kept", "multitask", ">= 0.5", "<= teacher", "regex:(", "llama", "packaged:x"]),
)  # fmt: skip
wild = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8,
)
small = st.one_of(st.integers(-3, 48), st.sampled_from([None, "x", 1.5, [1], {"a": 1}, True]))


def _edit(key: str) -> st.SearchStrategy:
    if key in SMALL:
        value = small
    elif key in SCHEMA:
        value = st.one_of(_plausible(SCHEMA[key]), _plausible(SCHEMA[key]), wild)
    else:
        value = wild
    return st.tuples(st.just(key), value)


edits = st.lists(st.sampled_from(sorted(SCHEMA) + EXTRA).flatmap(_edit), max_size=3)
raw_documents = st.integers(0, 5).flatmap(
    lambda k: st.none() if k < 4 else st.text(max_size=200) if k == 4 else st.binary(max_size=200)
)


def _set(tree: dict, dotted: str, value) -> None:
    node = tree
    *parents, last = dotted.split(".")
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[last] = value


def _no_traceback(result) -> None:
    """The error boundary: an exit code, no traceback, at most one error line (exactly one
    on a failure)."""
    event(f"exit {result.code}")  # --hypothesis-show-statistics: how many got through to setup
    assert "Traceback" not in result.err, result.err
    errors = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert result.code in (0, 1, 2), result.err
    assert len(errors) == (0 if result.code == 0 else 1), result.err


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on: the generate command reads its prompts, then its
    one request is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def setup_only(monkeypatch):
    """`distill train` runs everything up to the first optimizer step (`training.setup`),
    with the hub offline (a model name is looked up on disk only)."""
    from accelerate.state import AcceleratorState

    from distill.pipeline import runner
    from distill.training.resume import release_run_dir
    from distill.training.setup import setup

    def train(cfg, resume=False, show_progress=True):
        # accelerate keeps one state per process: a new example may ask another precision,
        # which a fresh `distill` process would simply get
        AcceleratorState._reset_state(reset_partial_state=True)
        try:
            setup(cfg, resume)
        finally:
            release_run_dir(cfg.out_dir)
        return {}

    monkeypatch.setattr(runner, "train", train)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: set it here


@FUZZ
@given(edits=edits, raw=raw_documents)
def test_no_config_produces_a_traceback(cli, setup_only, edits, raw):
    work = Path(tempfile.mkdtemp(prefix="distill-fuzz-"))
    try:
        config = work / "run.yaml"
        if raw is None:
            tree = json.loads(json.dumps(BASE))
            for key, value in edits:
                _set(tree, key, value)
            tree["out_dir"] = str(work / "run")
            config.write_text(yaml.safe_dump(tree, allow_unicode=True))
        elif isinstance(raw, bytes):
            config.write_bytes(raw)
        else:
            config.write_text(raw)
        overrides = [f"{k}={json.dumps(v)}" for k, v in edits[:2]] if raw is not None else []
        _no_traceback(cli("train", config, *overrides, "--no-eval"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


row_keys = st.sampled_from(["prompt", "completion", "text", "answer", "rationale", "key", "finish_reason", "prompt_hash", "x"])
turns = st.fixed_dictionaries(  # chat rows: plausible turns and wild ones
    {"role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), wild), "content": st.one_of(st.text(max_size=20), wild)}
)
rows = st.one_of(
    st.fixed_dictionaries({"messages": st.one_of(st.lists(turns, max_size=4), wild)}).map(lambda d: json.dumps(d).encode()),
    st.dictionaries(row_keys, wild, max_size=5).map(lambda d: json.dumps(d).encode()),
    st.fixed_dictionaries({"prompt": st.text(max_size=30), "completion": st.text(max_size=30)}, optional={"answer": wild}).map(
        lambda d: json.dumps(d, ensure_ascii=False).encode()
    ),
    wild.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40),
    st.text(max_size=40).map(str.encode),
)


@FUZZ
@given(lines=st.lists(rows, max_size=8), newline=st.booleans())
def test_no_jsonl_rows_produce_a_traceback(cli, setup_only, closed_port, lines, newline):
    work = Path(tempfile.mkdtemp(prefix="distill-fuzz-"))
    try:
        data = work / "rows.jsonl"
        data.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines) + (b"\n" if newline else b""))
        _no_traceback(cli("curate", data, "--out", work / "curated" / "curated.jsonl"))
        server = ["--server", f"http://127.0.0.1:{closed_port}/v1", "--model", "m", "--max-retries", "0"]
        _no_traceback(cli("generate", "--prompts", data, "--out", work / "gen", *server))
        tree = {**json.loads(json.dumps(BASE)), "data": {"source": str(data)}, "out_dir": str(work / "run")}
        config = work / "run.yaml"
        config.write_text(yaml.safe_dump(tree))
        _no_traceback(cli("train", config, "--no-eval"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
