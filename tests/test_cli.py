"""The command line: user errors are one line on stderr, a non-zero exit, no traceback."""

import os
import subprocess
import sys

import yaml

from helpers import TINY_STUDENT, TINY_TEACHER


def run_cli(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def one_line_error(proc, code, pattern):
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    import re

    assert re.search(pattern, lines[0]), lines[0]


def write_cfg(tmp_path, tree, name="run.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(tree))
    return p


def tree(tmp_path, **data):
    return {
        "student": {"config": TINY_STUDENT, "tokenizer": "builtin"},
        "teacher": {"config": TINY_TEACHER, "tokenizer": "builtin"},
        "data": {"n_train": 64, "n_test": 4, **data},
        "train": {"steps": 2, "micro_batch_size": 4},
        "eval": {"max_new_tokens": 4},
        "out_dir": str(tmp_path / "run"),
    }


def test_unknown_key_exits_2_and_writes_nothing(tmp_path):
    p = write_cfg(tmp_path, tree(tmp_path))
    proc = run_cli("train", str(p), "train.stepz=3")
    one_line_error(proc, 2, r"unknown key 'train.stepz' \(did you mean 'train.steps'\?\)")
    assert not (tmp_path / "run").exists()


def test_missing_config_file(tmp_path):
    one_line_error(run_cli("train", str(tmp_path / "nope.yaml")), 2, "config file not found")


def test_malformed_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("student:\n  config: {model_type: llama\ntrain: 1\n")
    one_line_error(run_cli("train", str(p)), 2, r"bad.yaml:\d+: malformed YAML")


def test_malformed_dataset_names_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "Q:", "completion": "1"}\n{"prompt": 1}\n')
    p = write_cfg(tmp_path, tree(tmp_path, source=str(data)))
    one_line_error(run_cli("train", str(p)), 1, r"d.jsonl:2: a row needs 'completion'")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_empty_dataset(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n")
    p = write_cfg(tmp_path, tree(tmp_path, source=str(data)))
    one_line_error(run_cli("train", str(p)), 1, r"d.jsonl: the dataset is empty")


def test_missing_model_folder(tmp_path):
    t = tree(tmp_path)
    t["teacher"] = {"name": str(tmp_path / "no-such-teacher")}
    one_line_error(run_cli("train", str(write_cfg(tmp_path, t))), 1, "no-such-teacher")


def test_vocabulary_mismatch(tmp_path):
    """A teacher whose tokenizer maps tokens to other ids cannot be distilled from."""
    from transformers import AutoTokenizer

    from distill.data.tasks.tokenizer import chain_tokenizer
    from distill.models.loading import load_causal_lm

    tok = chain_tokenizer()
    teacher_dir = tmp_path / "teacher"
    model = load_causal_lm(config={**TINY_TEACHER, "vocab_size": len(tok)})
    model.save_pretrained(teacher_dir)
    vocab = tok.get_vocab()
    a, b = vocab["1"], vocab["2"]
    vocab["1"], vocab["2"] = b, a  # swap two ids
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>").save_pretrained(
        teacher_dir
    )
    assert AutoTokenizer.from_pretrained(teacher_dir).get_vocab()["1"] == b
    t = tree(tmp_path)
    t["teacher"] = {"name": str(teacher_dir)}
    one_line_error(run_cli("train", str(write_cfg(tmp_path, t))), 1, r"tokenizers differ on 2 tokens")


def test_train_then_resume_and_eval_from_cli(tmp_path):
    p = write_cfg(tmp_path, tree(tmp_path))
    proc = run_cli("train", str(p))
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    assert (run / "eval.json").exists() and (run / "student" / "model.safetensors").exists()
    proc = run_cli("train", "--resume", str(run), "train.steps=3", "--no-eval")
    assert proc.returncode == 0, proc.stderr
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    proc = run_cli("eval", str(run))
    assert proc.returncode == 0, proc.stderr
    assert '"accuracy"' in proc.stdout
    one_line_error(run_cli("train", str(p)), 1, "already holds a run")


def test_report_and_latents_commands(tmp_path):
    proc = run_cli("latents", "--simulate", "--out", str(tmp_path / "toy.html"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "toy.html") and "Plotly" in (tmp_path / "toy.html").read_text()
    one_line_error(run_cli("latents", "--out", str(tmp_path / "x.html")), 1, "give run directories, or --simulate")
    (tmp_path / "notarun").mkdir()
    one_line_error(run_cli("report", str(tmp_path / "notarun"), "--out", str(tmp_path / "r.html")), 1, "not a run directory")
    one_line_error(run_cli("latents", str(tmp_path / "notarun")), 1, "notarun")
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "x.html").exists()


def test_an_unknown_option_is_a_usage_error_not_a_traceback():
    proc = run_cli("train", "--bogus")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "No such option: --bogus" in proc.stderr


def test_ctrl_c_exits_130_and_says_interrupted(tmp_path):
    """A SIGINT during training ends the command with 130 and "interrupted", never exit 0."""
    import signal
    import time

    t = tree(tmp_path)
    t["train"]["steps"] = 100000  # runs until interrupted
    cfg = write_cfg(tmp_path, t)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A runner started in the background (`cmd &` in a script, nohup) ignores SIGINT and its
    # children inherit that; Python then never installs its KeyboardInterrupt handler. With a
    # handler here while the child starts, exec gives the child the default disposition, as
    # under an interactive terminal.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "distill", "train", str(cfg)], stderr=subprocess.PIPE, text=True, env=env)
    finally:
        signal.signal(signal.SIGINT, before)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
