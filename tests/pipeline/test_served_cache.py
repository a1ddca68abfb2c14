"""`distill cache --server`: the teacher cache from a served teacher's prompt log-probs,
against a real loopback server backed by the same tiny model as a local cache."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill.config import build_config
from distill.data.rows import Example
from distill.data.teacher_cache import read_manifest
from distill.errors import DistillError
from distill.models.build import build_model, build_tokenizer
from distill.pipeline.cache import write_teacher_cache
from distill.pipeline.chat_client import ServerSettings
from distill.pipeline.served_cache import _ranked, example_topk

from chat_server import ChatServer

KEY = "sk-served-cache-secret-0123456789"


def served_tree(tiny_tree, n_train=40):
    tiny_tree["objective"]["temperature"] = 1.0  # a server's prompt log-probs are at T = 1
    tiny_tree["data"]["n_train"] = n_train
    return tiny_tree


def teacher_server(tree, **kw) -> ChatServer:
    """A loopback server over the run's own teacher (same init as a local cache's)."""
    cfg = build_config(tree)
    tok = build_tokenizer(cfg.teacher, "teacher")
    model = build_model(cfg.teacher, tok, "teacher", cfg.train.seed + 1).eval()
    return ChatServer(model, tok, **kw)


def shards(out) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in load_file(str(p)).items()} for p in sorted(Path(out).glob("shard-*.safetensors"))]


def settings(server, **kw) -> ServerSettings:
    return ServerSettings(server.url, "tiny-teacher", **{"api_key_env": None, "concurrency": 4, "backoff_s": 0.01, **kw})


def assert_same_cache(served, local, atol=1e-3):
    a, b = shards(served), shards(local)
    assert len(a) == len(b) >= 1
    for x, y in zip(a, b):
        assert torch.equal(x["offsets"], y["offsets"]) and torch.equal(x["ids"], y["ids"])
        torch.testing.assert_close(x["logprobs"].float(), y["logprobs"].float(), rtol=0, atol=atol)  # fp16 rounding
        finite = torch.isfinite(y["rest"])
        assert torch.equal(finite, torch.isfinite(x["rest"]))
        torch.testing.assert_close(x["rest"][finite], y["rest"][finite], rtol=0, atol=atol)


def test_served_cache_equals_the_local_one(tiny_tree, tmp_path):
    tree = served_tree(tiny_tree)
    cfg = build_config(tree)
    local = write_teacher_cache(cfg, tmp_path / "local", 5, "float16", 16, 8, show_progress=False)
    with teacher_server(tree) as server:
        served = write_teacher_cache(cfg, tmp_path / "served", 5, "float16", 16, 8, show_progress=False, server=settings(server))
        assert all(r["body"]["prompt_logprobs"] == 5 and r["body"]["max_tokens"] == 1 for r in server.requests)
        assert len(server.requests) == cfg.data.n_train and server.max_in_flight > 1
    assert served["teacher"] == "server:tiny-teacher" and served["complete"]
    assert {k: v for k, v in served.items() if k not in ("teacher", "shards")} == {
        k: v for k, v in local.items() if k not in ("teacher", "shards")
    }
    assert_same_cache(tmp_path / "served", tmp_path / "local")
    budget = json.loads((tmp_path / "served" / "budget.json").read_text())
    assert budget["phases"]["teacher_caching"]["tokens"] > 0


def test_packed_blocks_are_sent_one_document_at_a_time(tiny_tree, tmp_path):
    tree = served_tree(tiny_tree, n_train=24)
    tree["data"]["packing"] = True
    cfg = build_config(tree)
    write_teacher_cache(cfg, tmp_path / "local", 4, "float32", 8, 8, show_progress=False)
    with teacher_server(tree) as server:
        write_teacher_cache(cfg, tmp_path / "served", 4, "float32", 8, 8, show_progress=False, server=settings(server))
        assert len(server.requests) == 24  # one request per document, not per block
    assert_same_cache(tmp_path / "served", tmp_path / "local", atol=1e-5)


def test_a_flaky_server_is_retried_and_the_key_never_written(tiny_tree, tmp_path, monkeypatch):
    tree = served_tree(tiny_tree)
    cfg = build_config(tree)
    write_teacher_cache(cfg, tmp_path / "local", 4, "float32", 16, 8, show_progress=False)
    monkeypatch.setenv("DISTILL_TEST_KEY", KEY)
    with teacher_server(tree, api_key=KEY) as server:
        server.faults.extend(["500", "drop", "429", "503", "drop"])
        s = settings(server, api_key_env="DISTILL_TEST_KEY")
        write_teacher_cache(cfg, tmp_path / "served", 4, "float32", 16, 8, show_progress=False, server=s)
        assert len(server.requests) == cfg.data.n_train + 5
        assert all(r["headers"]["Authorization"] == f"Bearer {KEY}" for r in server.requests)
    assert_same_cache(tmp_path / "served", tmp_path / "local", atol=1e-5)
    for path in (tmp_path / "served").rglob("*"):
        assert KEY.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(
    ("fault", "message"),
    [("few_logprobs", "3 ranked log-probabilities, --top-k asked for 4"), ("add_bos", "prompt log-probability entries for a prompt of")],
)
def test_a_server_that_answers_something_else_is_one_line(tiny_tree, tmp_path, fault, message):
    tree = served_tree(tiny_tree)
    cfg = build_config(tree)
    with teacher_server(tree) as server:
        server.faults.extend([fault] * 200)
        with pytest.raises(DistillError, match=message) as err:
            write_teacher_cache(cfg, tmp_path / "c", 4, "float32", 16, 8, show_progress=False, server=settings(server))
    assert "\n" not in str(err.value) and "example" in str(err.value)
    assert read_manifest(tmp_path / "c")["shards"] == []  # nothing stored


def test_checks_of_one_position():
    entry = {"3": {"logprob": -0.5, "rank": 1}, "7": {"logprob": -1.5, "rank": 2}, "9": {"logprob": -6.0, "rank": 40}}
    assert _ranked(entry, 1, 9, 2, 10, "x") == ([3, 7], [-0.5, -1.5])
    with pytest.raises(DistillError, match="no log-probability for the prompt's own token 5"):
        _ranked(entry, 1, 5, 2, 10, "x")
    with pytest.raises(DistillError, match="token id 9 is outside the vocabulary of 8"):
        _ranked(entry, 1, 3, 2, 8, "x")
    with pytest.raises(DistillError, match="no log-probabilities at prompt position 2"):
        _ranked(None, 2, 3, 2, 10, "x")
    example = Example(input_ids=[1, 3, 7], labels=[-100, 3, 7])
    ids, _lp, rest = example_topk(example, [[None, entry, {"7": {"logprob": 0.0, "rank": 1}, "1": {"logprob": -30.0, "rank": 2}}]], 2, 10, "x")
    assert ids.tolist() == [[3, 7], [7, 1]]
    expected = (1 - torch.tensor([-0.5, -1.5], dtype=torch.float64).exp().sum()).log().float()
    torch.testing.assert_close(rest[0], expected)
    assert rest[1] == -torch.inf or rest[1] < -25  # nothing (or next to nothing) left outside the top-2


def test_cli_server_options_and_temperature(tiny_tree, tmp_path):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_tree))  # temperature 2
    run = [sys.executable, "-m", "distill", "cache", str(cfg_path), "--out", str(tmp_path / "c")]
    no_model = subprocess.run([*run, "--server", "http://127.0.0.1:9/v1"], check=False, capture_output=True, text=True)
    assert no_model.returncode == 2 and "--server needs --model" in no_model.stderr
    hot = subprocess.run([*run, "--server", "http://127.0.0.1:9/v1", "--model", "m"], check=False, capture_output=True, text=True)
    assert hot.returncode != 0 and hot.stderr.strip().count("\n") == 0
    assert "objective.temperature is 2" in hot.stderr and not (tmp_path / "c").exists()


def test_kill_9_then_rerun_equals_an_uninterrupted_cache(tiny_tree, tmp_path):
    tree = served_tree(tiny_tree, n_train=600)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(tree))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with teacher_server(tree, delay_s=0.002) as server:

        def command(out):
            return [sys.executable, "-m", "distill", "cache", str(cfg_path), "--out", str(out), "--top-k", "4",
                    "--dtype", "float32", "--shard-examples", "20", "--server", server.url, "--model", "tiny"]  # fmt: skip

        out = tmp_path / "killed"
        proc = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        killed_at, deadline = None, time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                listed = len(json.loads((out / "manifest.json").read_text())["shards"])
            except (FileNotFoundError, json.JSONDecodeError):
                listed = 0
            if listed >= 2:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = listed
                break
            time.sleep(0.005)
        proc.wait()
        assert killed_at is not None and killed_at < 30, "the cache finished before it could be killed"
        subprocess.run(command(out), env=env, check=True, capture_output=True)
        cfg = build_config(tree)
        write_teacher_cache(cfg, tmp_path / "full", 4, "float32", 20, 8, show_progress=False, server=settings(server))
    manifest = read_manifest(out)
    assert manifest["complete"] and [s["index"] for s in manifest["shards"]] == list(range(30))
    assert not list(out.glob(".*.tmp"))
    for a, b in zip(shards(out), shards(tmp_path / "full"), strict=True):
        for name in a:
            assert torch.equal(a[name], b[name]), name
