"""The offline teacher cache: contents, training from it, identity checks, damage, kill -9."""

import copy
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

import distill.models.build as build_mod
from distill.config import build_config
from distill.data.build import build_examples
from distill.data.rows import collate
from distill.data.teacher_cache import TeacherCache, read_manifest, tokenizer_hash
from distill.errors import DistillError
from distill.loss.token_losses import IGNORE_INDEX
from distill.models.build import build_model, build_tokenizer
from distill.pipeline.cache import write_teacher_cache
from distill.training.loop import train

from helpers import read_metrics


def write(tree, out, k=4, dtype="float32", shard_examples=16):
    return write_teacher_cache(build_config(tree), out, k, dtype, shard_examples, batch_size=8, show_progress=False)


def shard_tensors(out) -> list[dict[str, torch.Tensor]]:
    # cloned: load_file maps the file, and the tests overwrite shards in place
    return [{k: v.clone() for k, v in load_file(str(p)).items()} for p in sorted(Path(out).glob("shard-*.safetensors"))]


def test_cache_holds_the_teachers_top_k(tiny_tree, tmp_path):
    tiny_tree["data"]["n_train"] = 40
    manifest = write(tiny_tree, tmp_path / "c", k=5, shard_examples=16)
    cfg = build_config(tiny_tree)
    tok = build_tokenizer(cfg.teacher, "teacher")
    assert manifest["complete"] and manifest["top_k"] == 5 and manifest["temperature"] == 2.0
    assert manifest["tokenizer_hash"] == tokenizer_hash(tok)
    assert [s["examples"] for s in manifest["shards"]] == [16, 16, 8]
    assert [s["first_example"] for s in manifest["shards"]] == [0, 16, 32]

    teacher = build_model(cfg.teacher, tok, "teacher", cfg.train.seed + 1).eval()
    examples = build_examples(cfg.data, tok)
    cache = TeacherCache(tmp_path / "c", {})
    batch = collate(examples[17:20], tok.pad_token_id)
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    log_p = torch.log_softmax(logits / 2.0, -1)  # (B, T-1, V)
    for row, i in enumerate(range(17, 20)):
        valid = batch["labels"][row, 1:] != IGNORE_INDEX
        ids, lp, rest = cache.example(i)
        top = log_p[row][valid].topk(5, -1)
        assert torch.equal(ids, top.indices)
        torch.testing.assert_close(lp, top.values, rtol=0, atol=1e-5)
        torch.testing.assert_close(rest.exp(), 1 - top.values.exp().sum(-1), rtol=0, atol=1e-5)
    tokens = sum(s["tokens"] for s in manifest["shards"])
    assert tokens == sum(int((torch.tensor(e.labels[1:]) != IGNORE_INDEX).sum()) for e in examples)


def test_top_k_taken_a_few_rows_at_a_time_is_the_same_cache(tiny_tree, tmp_path, monkeypatch):
    """The (rows, V) buffers are bounded (`topk_of_rows`); chunks of 3 rows (across example
    boundaries) write the same shards as chunks larger than the batch."""
    import distill.pipeline.cache as cache_mod

    tiny_tree["data"]["n_train"] = 20
    monkeypatch.setattr(cache_mod, "auto_chunk_size", lambda vocab, device: 10_000)
    write(tiny_tree, tmp_path / "whole", k=5)
    monkeypatch.setattr(cache_mod, "auto_chunk_size", lambda vocab, device: 3)
    write(tiny_tree, tmp_path / "chunked", k=5)
    for whole, chunked in zip(shard_tensors(tmp_path / "whole"), shard_tensors(tmp_path / "chunked"), strict=True):
        assert whole.keys() == chunked.keys()
        for key in whole:
            assert torch.equal(whole[key], chunked[key]), key


def test_training_from_a_full_cache_equals_the_live_teacher(tiny_tree, tmp_path):
    """With k = V the sparse divergence is the dense one: same metrics as the live teacher."""
    tiny_tree["objective"]["fused"] = False
    tiny_tree["data"]["n_train"] = 64
    vocab = len(build_tokenizer(build_config(tiny_tree).teacher, "teacher"))
    write(tiny_tree, tmp_path / "c", k=vocab)
    live = copy.deepcopy(tiny_tree)
    train(build_config(live), show_progress=False)
    cached = copy.deepcopy(tiny_tree)
    cached["teacher_cache"] = str(tmp_path / "c")
    cached["out_dir"] = str(tmp_path / "cached")
    summary = train(build_config(cached), show_progress=False)
    assert summary["teacher"] == "cache"
    for a, b in zip(read_metrics(live["out_dir"]), read_metrics(cached["out_dir"]), strict=True):
        for key in ("loss", "task_ce", "kd"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_fused_cache_path_trains_like_the_naive_one(tiny_tree, tmp_path):
    write(tiny_tree, tmp_path / "c", k=6, dtype="float16")
    runs = []
    for fused in (None, False):
        tree = copy.deepcopy(tiny_tree)
        tree["teacher_cache"] = str(tmp_path / "c")
        tree["objective"]["fused"] = fused
        tree["out_dir"] = str(tmp_path / f"run-{fused}")
        summary = train(build_config(tree), show_progress=False)
        assert summary["fused_loss"] is (fused is None)
        runs.append(read_metrics(tree["out_dir"]))
    for a, b in zip(*runs, strict=True):
        for key in ("loss", "task_ce", "kd", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key  # kd ~1e-3 here: fp32 rounding


def test_training_from_cache_never_loads_a_teacher(tiny_tree, tmp_path, monkeypatch):
    write(tiny_tree, tmp_path / "c", k=4, dtype="float16")
    tree = copy.deepcopy(tiny_tree)
    tree["teacher_cache"] = str(tmp_path / "c")
    real_build_model = build_mod.build_model

    def only_student(mcfg, tokenizer, role, seed):
        assert role == "student", "a teacher model was built while training from the cache"
        return real_build_model(mcfg, tokenizer, role, seed)

    monkeypatch.setattr(build_mod, "build_model", only_student)
    summary = train(build_config(tree), show_progress=False)
    metrics = read_metrics(tree["out_dir"])
    assert summary["teacher"] == "cache" and len(metrics) == 4
    assert all(m["kd"] > 0 and torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    del tree["teacher"]  # no teacher section at all is fine too
    tree["out_dir"] = str(tmp_path / "no-teacher")
    assert train(build_config(tree), show_progress=False)["teacher"] == "cache"


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (("data", "n_train", 100), "dataset_hash"),
        (("objective", "temperature", 1.0), "temperature"),
        (("teacher", "config", {"model_type": "llama", "hidden_size": 16, "num_attention_heads": 2}), "teacher"),
    ],
)
def test_a_cache_of_another_run_is_refused(tiny_tree, tmp_path, change, key):
    write(tiny_tree, tmp_path / "c")
    tree = copy.deepcopy(tiny_tree)
    section, field, value = change
    tree[section][field] = value
    tree["teacher_cache"] = str(tmp_path / "c")
    with pytest.raises(DistillError, match=f"the cache's {key} is"):
        train(build_config(tree), show_progress=False)
    assert not Path(tree["out_dir"]).exists()  # refused before anything is written


def test_tokenizer_hash_tells_tokenizers_apart():
    from distill.data.tasks.tokenizer import chain_tokenizer

    a, b = chain_tokenizer(), chain_tokenizer()
    assert tokenizer_hash(a) == tokenizer_hash(b)
    b.add_tokens(["<extra>"])
    assert tokenizer_hash(a) != tokenizer_hash(b)


def test_damaged_shards_are_named_and_rewritten(tiny_tree, tmp_path):
    tiny_tree["data"]["n_train"] = 48
    out = tmp_path / "c"
    write(tiny_tree, out)
    before = shard_tensors(out)
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # one flipped bit pattern in the payload
    shard.write_bytes(bytes(data))
    with pytest.raises(DistillError, match=r"shard-00001\.safetensors: checksum mismatch"):
        TeacherCache(out, {})
    shard.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(DistillError, match=r"shard-00001\.safetensors: truncated"):
        TeacherCache(out, {})
    write(tiny_tree, out)  # the same command again rewrites exactly the damaged shard
    (out / "shard-00002.safetensors").unlink()
    with pytest.raises(DistillError, match=r"shard-00002\.safetensors: shard missing"):
        TeacherCache(out, {})
    write(tiny_tree, out)
    after = shard_tensors(out)
    for a, b in zip(before, after, strict=True):
        for name in a:
            assert torch.equal(a[name], b[name])
    TeacherCache(out, {})


def test_an_unfinished_cache_is_refused(tiny_tree, tmp_path):
    out = tmp_path / "c"
    write(tiny_tree, out)
    manifest = read_manifest(out)
    manifest["complete"], manifest["shards"] = False, manifest["shards"][:1]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DistillError, match="incomplete cache"):
        TeacherCache(out, {})


def test_kill_9_then_rerun_loses_and_duplicates_nothing(tiny_tree, tmp_path):
    tiny_tree["data"]["n_train"] = 3000
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_tree))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(out):
        return [sys.executable, "-m", "distill", "cache", str(cfg_path), "--out", str(out), "--top-k", "4",
                "--dtype", "float32", "--shard-examples", "50", "--batch-size", "25"]  # fmt: skip

    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            manifest = json.loads((out / "manifest.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            manifest = {"shards": []}
        if len(manifest["shards"]) >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = len(manifest["shards"])
            break
        time.sleep(0.005)
    proc.wait()
    assert killed_at is not None and killed_at < 60, "the run finished before it could be killed"
    assert not read_manifest(out)["complete"]
    subprocess.run(command(out), env=env, check=True, capture_output=True)
    full = tmp_path / "full"
    subprocess.run(command(full), env=env, check=True, capture_output=True)

    manifest = read_manifest(out)
    assert manifest["complete"] and [s["index"] for s in manifest["shards"]] == list(range(60))
    assert sum(s["examples"] for s in manifest["shards"]) == 3000
    assert not list(out.glob(".*.tmp"))
    for a, b in zip(shard_tensors(out), shard_tensors(full), strict=True):
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_cli_cache_summary_and_errors(tiny_tree, tmp_path):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_tree))
    run = [sys.executable, "-m", "distill", "cache", str(cfg_path), "--out", str(tmp_path / "c")]
    done = subprocess.run([*run, "--top-k", "8"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["examples"] == 128 and summary["bytes_per_token"] > 8 * 4 + 8 * 2
    bad = subprocess.run([*run, "--top-k", "100000"], capture_output=True, text=True)
    assert bad.returncode != 0
    assert bad.stderr.strip().count("\n") == 0 and "--top-k must be in [1," in bad.stderr
    other = subprocess.run([*run, "--top-k", "4"], capture_output=True, text=True)  # same dir, other k
    assert other.returncode != 0 and "top_k=8 already lives here" in other.stderr
