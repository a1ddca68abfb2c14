"""Teacher caches (findings 11, 15, 16, 19): a manifest is checked field by field (a shard
file outside the cache folder, a list, no shards, an empty shard list: one line each); a
damaged shard is named and rewritten by `distill cache`, named by the run that refuses it;
a kill between a shard and its budget record loses no budget."""

import json
import shutil
from pathlib import Path

import pytest
from fault_helpers import one_line

ARGS = ("--top-k", "4", "--shard-examples", "8", "--batch-size", "8")


@pytest.fixture
def cache(cli, tree, write_yaml, tmp_path) -> tuple[Path, Path, Path]:
    """(a complete 4-shard cache of the tiny teacher, the config that writes it, the run
    config that trains from it)."""
    config = write_yaml(tree)
    out = tmp_path / "cache"
    result = cli("cache", config, "--out", out, *ARGS)
    assert result.code == 0, result.err
    student = {**tree, "teacher_cache": str(out), "teacher": None}
    return out, config, write_yaml(student, "from-cache.yaml")


def _manifest(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def test_a_shard_file_outside_the_cache_is_never_read(cli, cache, tmp_path):
    """Finding 15: a shard `file` of ../../x.safetensors was read from outside the folder,
    here with the right size and checksum (the manifest's author controls both)."""
    folder, teacher, config = cache
    m = _manifest(folder)
    outside = tmp_path / "elsewhere" / "x.safetensors"
    outside.parent.mkdir()
    shutil.copy(folder / m["shards"][0]["file"], outside)
    m["shards"][0]["file"] = "../elsewhere/x.safetensors"
    (folder / "manifest.json").write_text(json.dumps(m))
    pattern = r"manifest.json: shards\[0\].file is '../elsewhere/x.safetensors', not a shard file name inside the cache folder"
    one_line(cli("train", config, "--no-eval"), 1, pattern)
    one_line(cli("cache", teacher, "--out", folder, *ARGS), 1, pattern)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("tamper", "pattern"),
    [
        (lambda m: [m], r"manifest.json: a JSON list, not an object; not a manifest `distill cache` writes"),
        (lambda m: {k: v for k, v in m.items() if k != "shards"}, r"manifest.json: no 'shards' list"),
        (lambda m: {**m, "shards": []}, r"manifest.json: marked complete with 0 of the 4 shards its 32 examples need"),
        (lambda m: {**m, "shards": m["shards"][:3]}, r"marked complete with 3 of the 4 shards"),
        (lambda m: {**m, "shards": [{**m["shards"][0], "bytes": "many"}, *m["shards"][1:]]}, r"shards\[0\].bytes is 'many'"),
        (lambda m: {**m, "top_k": 0}, r"manifest.json: top_k is 0, not a positive integer"),
    ],
)
def test_a_tampered_manifest_is_one_line(cli, cache, tamper, pattern):
    folder, _, config = cache
    (folder / "manifest.json").write_text(json.dumps(tamper(_manifest(folder))))
    one_line(cli("train", config, "--no-eval"), 1, pattern)


def test_a_damaged_shard_is_named_and_rewritten(cli, cache):
    """Finding 19: the docs said a damaged shard "is named and rewritten"; it was rewritten,
    not named. `distill cache` now names it on stderr; a run names it in its error."""
    folder, teacher, config = cache
    shard = folder / "shard-00001.safetensors"
    good = shard.read_bytes()
    shard.write_bytes(good[:-10] + b"\x00" * 10)  # same size, other bytes
    one_line(
        cli("train", config, "--no-eval"), 1, r"shard-00001.safetensors: checksum mismatch \(corrupted\); rerun `distill cache`"
    )
    result = cli("cache", teacher, "--out", folder, *ARGS)
    assert result.code == 0, result.err
    assert f"{shard}: checksum mismatch (corrupted); rewriting it" in result.err.splitlines()
    assert shard.read_bytes() == good
    assert cli("train", config, "--no-eval").code == 0


def test_a_kill_between_a_shard_and_its_budget_record_loses_nothing(cli, tree, write_yaml, tmp_path, monkeypatch):
    """Finding 16 (cache): the budget is recomputed from the manifest at every shard."""
    import distill.pipeline.cache as writer

    config = write_yaml(tree)
    assert cli("cache", config, "--out", tmp_path / "whole", *ARGS).code == 0
    real, calls = writer.record_phase, {"n": 0}

    def killed_after_second_shard(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # shard 1 is written and listed; its record never happens
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(writer, "record_phase", killed_after_second_shard)
    assert cli("cache", config, "--out", tmp_path / "cut", *ARGS).code == 130
    monkeypatch.setattr(writer, "record_phase", real)
    assert len(_manifest(tmp_path / "cut")["shards"]) == 2
    assert cli("cache", config, "--out", tmp_path / "cut", *ARGS).code == 0
    got, want = (json.loads((tmp_path / d / "budget.json").read_text())["phases"]["teacher_caching"] for d in ("cut", "whole"))
    assert got["tokens"] == want["tokens"] and got["flops"] == want["flops"] and got["records"] == want["records"] == 4
