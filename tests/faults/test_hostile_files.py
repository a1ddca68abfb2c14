"""Damaged or hostile files from elsewhere (finding 11): model folders (truncated
safetensors, a pickle that is not weights, a malformed GGUF), non-UTF-8 data, damaged latent
snapshots. One line each, never a traceback, and never code from a file."""

import json
import pickle
import struct
from pathlib import Path

import pytest
from fault_helpers import one_line
from safetensors.torch import save_file

from distill.config import build_config
from distill.training.loop import train


class _Boom:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory) -> Path:
    from distill.data.tasks.tokenizer import chain_tokenizer
    from distill.models.loading import load_causal_lm

    from helpers import TINY_TEACHER

    folder = tmp_path_factory.mktemp("teacher")
    tok = chain_tokenizer()
    load_causal_lm(config={**TINY_TEACHER, "vocab_size": len(tok)}).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _copy(folder: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(folder, to)
    return to


@pytest.mark.parametrize("damage", ["truncated safetensors", "pickle that runs code", "malformed gguf", "truncated gguf"])
def test_a_damaged_model_is_one_line(cli, tree, write_yaml, tmp_path, teacher_folder, damage):
    marker = tmp_path / "marker"
    if damage == "truncated safetensors":
        folder = _copy(teacher_folder, tmp_path / "teacher")
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
        tree["teacher"] = {"name": str(folder)}
        pattern = r"could not load model '.*teacher': Error while deserializing header"
    elif damage == "pickle that runs code":
        folder = _copy(teacher_folder, tmp_path / "teacher")
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(str(marker))))
        tree["teacher"] = {"name": str(folder)}
        pattern = r"could not load model '.*teacher': "
    else:
        gguf = tmp_path / "teacher.gguf"
        header = b"GGUF" + struct.pack("<IQQ", 3, 2**40, 2**40)  # a v3 header promising 2**40 tensors, then nothing
        gguf.write_bytes(header if damage == "truncated gguf" else b"GGUF" + bytes(range(200)))
        tree["teacher"] = {"name": str(gguf), "tokenizer": "builtin"}
        pattern = r"could not read GGUF file .*teacher.gguf: "
    one_line(cli("train", write_yaml(tree)), 1, pattern)
    one_line(cli("eval", tree["teacher"]["name"], "--config", write_yaml(tree)), 1, pattern)  # the model folder itself
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


def test_non_utf8_data_names_the_line(cli, tree, write_yaml, tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"prompt": "Q:", "completion": "1"}\n{"prompt": "caf\xe9", "completion": "1"}\n')
    tree["data"] = {"source": str(data)}
    one_line(cli("train", write_yaml(tree)), 1, r"latin1.jsonl:2: not UTF-8 text \(byte 15 of the line\)")
    one_line(cli("generate", "--prompts", data, "--out", tmp_path / "g", "--teacher", "x"), 1, r"latin1.jsonl:2: not UTF-8 text")
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "generations.jsonl").write_bytes(b'{"key": "a", "prompt": "p\xff", "completion": "c"}\n')
    one_line(cli("curate", gen), 1, r"generations.jsonl:1: not UTF-8 text")
    one_line(
        cli(
            "generate",
            "--prompts",
            "builtin:chain",
            "--n",
            "1",
            "--out",
            gen,
            "--server",
            "http://127.0.0.1:9/v1",
            "--model",
            "m",
        ),
        1,
        r"generations.jsonl:1: not a generation row; move the file aside",
    )


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory) -> Path:
    from helpers import TINY_STUDENT, TINY_TEACHER

    out = tmp_path_factory.mktemp("latents") / "run"
    train(build_config({
        "student": {"config": TINY_STUDENT, "tokenizer": "builtin"}, "teacher": {"config": TINY_TEACHER, "tokenizer": "builtin"},
        "data": {"n_train": 32, "n_test": 8}, "train": {"steps": 2, "micro_batch_size": 4}, "out_dir": str(out),
    }), show_progress=False)  # fmt: skip
    return out


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        ("truncated snapshot", r"step-000002.safetensors: unreadable latent snapshot \(Error while deserializing header"),
        ("snapshot of other keys", r"latents/ is damaged \(KeyError: "),
        ("garbled probe.json", r"probe.json:1: latent probe record is not valid JSON"),
        ("probe.json without pairs", r"probe.json: no layer pairs; the probe record is damaged"),
    ],
)
def test_damaged_latents_are_one_line(cli, latent_run, tmp_path, damage, pattern):
    import shutil

    run = shutil.copytree(latent_run, tmp_path / "run")
    latents = run / "latents"
    if damage == "truncated snapshot":
        data = (latents / "step-000002.safetensors").read_bytes()
        (latents / "step-000002.safetensors").write_bytes(data[:50])
    elif damage == "snapshot of other keys":
        import torch

        save_file({"something.else": torch.zeros(2, 2)}, str(latents / "step-000002.safetensors"))
    elif damage == "garbled probe.json":
        (latents / "probe.json").write_text('{"pairs": [')
    else:
        (latents / "probe.json").write_text(json.dumps({"tokens": {}}))
    one_line(cli("latents", run, "--out", tmp_path / "l.html"), 1, pattern)
    assert not (tmp_path / "l.html").exists()


def test_text_rows_that_all_fall_in_the_held_out_split_are_one_line(cli, tree, write_yaml, tmp_path):
    """Found by the fuzzer: two equal {"text"} rows share a split, here the held-out one, and
    the empty training split reached the tokenizer (IndexError)."""
    data = tmp_path / "same.jsonl"
    data.write_text('{"text": "0"}\n{"text": "0"}\n')
    tree["data"] = {"source": str(data)}
    one_line(cli("train", write_yaml(tree)), 1, r"same.jsonl: all 2 text rows fall in the held-out split; add rows or set")


def test_a_tampered_budget_or_checkpoint_budget_is_one_line_or_ignored(cli, tree, write_yaml):
    """A run folder from elsewhere: budget.json that is not a budget file is one line; a
    checkpoint's budget record of the wrong types counts as nothing, never a crash."""
    tree["train"]["steps"] = 2
    assert cli("train", write_yaml(tree), "--no-eval").code == 0
    run = Path(tree["out_dir"])
    state = run / "checkpoints" / "step-000002" / "state.json"
    record = json.loads(state.read_text())
    state.write_text(json.dumps({**record, "budget": {"tokens": "many", "seconds": None, "teacher_s": [], "records": 1}}))
    budget = run / "budget.json"
    budget.write_text("[1, 2]")
    one_line(cli("train", "--resume", run, "train.steps=3", "--no-eval"), 1, r"budget.json: not a budget file")
    budget.unlink()
    result = cli("train", "--resume", run, "train.steps=3", "--no-eval")
    assert result.code == 0, result.err
    assert json.loads(budget.read_text())["phases"]["student_training"]["records"] == 2
