"""Config errors (findings 4, 11, 12): one line naming the file, the key, the value and what
is expected; exit 2; nothing written. Checked before anything is built or trained, so a bad
evaluation setting no longer surfaces only after the whole run. `--debug` adds the traceback."""

import pytest
from fault_helpers import one_line


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        # finding 4: gradient ascent and a negative learning rate trained silently
        ("train.max_grad_norm=-1", r"'train.max_grad_norm': expected greater than 0, got -1"),
        ("train.min_lr_ratio=-0.5", r"'train.min_lr_ratio': expected greater than or equal to 0, got -0.5"),
        ("train.min_lr_ratio=1.5", r"'train.min_lr_ratio': expected less than or equal to 1, got 1.5"),
        # finding 11: optimizer and data values that ended in a traceback
        ("train.betas=[1.5,2]", r"'train.betas': each beta must be in \[0, 1\), got \[1.5, 2.0\]"),
        ("train.betas=[0.9,1.0]", r"'train.betas': each beta must be in \[0, 1\)"),
        ("train.weight_decay=-1", r"'train.weight_decay': expected greater than or equal to 0, got -1"),
        ("train.warmup_steps=-5", r"'train.warmup_steps': expected greater than or equal to 0, got -5"),
        ("train.lr=.inf", r"'train.lr': expected a finite number, got inf"),
        ("objective.temperature=.nan", r"'objective.temperature': expected a finite number, got nan"),
        ("data.n_train=0", r"'data.n_train': expected greater than or equal to 1, got 0"),
        ("train.seed=-1", r"'train.seed': expected greater than or equal to 0, got -1"),  # found by the fuzzer
        ("data.min_ops=7", r"'data': min_ops=7 is above max_ops=6"),
        ("data.max_ops=1000000", r"'data.max_ops': expected less than or equal to 1000, got 1000000"),
        # finding 12: evaluation settings that failed only after the whole training run
        ("eval.batch_size=0", r"'eval.batch_size': expected greater than or equal to 1, got 0"),
        ("eval.max_new_tokens=-1", r"'eval.max_new_tokens': expected greater than or equal to 1, got -1"),
        # finding 11: an invalid inline model config, checked by its transformers config class
        ("student.config.num_attention_heads=3", r"'student.config': not a valid llama config \(The hidden size \(32\) "),
        ("student.config.hidden_size=x", r"'student.config': hidden_size must be a positive integer, got 'x'"),
        ("student.config.num_hidden_layers=-1", r"'student.config': num_hidden_layers must be a positive integer, got -1"),
        ("teacher.config.model_type=nope", r"'teacher.config': unknown model_type 'nope'"),
        ("student.config.tie_word_embeddings=maybe", r"'student.config': not a valid llama config \(.*tie_word_embeddings"),
    ],
)
def test_a_bad_value_is_one_line_exit_2_and_writes_nothing(cli, tree, write_yaml, tmp_path, override, pattern):
    config = write_yaml(tree)
    line = one_line(cli("train", config, override), 2, pattern)
    assert line.startswith(f"error: {config}: ")  # the file, then the key
    assert not (tmp_path / "run").exists()


def test_a_missing_eval_source_stops_before_training(cli, tree, write_yaml, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "Q:1+1=", "completion": "2#2"}\n' * 8)
    tree["data"] = {"source": str(data), "eval_source": str(tmp_path / "held-out.jsonl")}
    one_line(cli("train", write_yaml(tree)), 2, r"'data.eval_source': file not found: '.*held-out.jsonl'")
    assert not (tmp_path / "run").exists()


def test_a_model_config_that_builds_no_model_is_one_line(cli, tree, write_yaml, tmp_path):
    """hidden_act passes the config class and fails only when the model is built: exit 1,
    still before the run folder exists."""
    tree["student"]["config"]["hidden_act"] = "no-such-activation"
    one_line(cli("train", write_yaml(tree)), 1, r"inline llama config: the model cannot be built \('no-such-activation'\)")
    assert not (tmp_path / "run").exists()


def test_a_builtin_task_too_small_for_n_train_is_refused_not_a_hang(cli, tree, write_yaml, tmp_path):
    """One operation gives only 300 distinct problems: asking for 20000 used to loop forever."""
    config = write_yaml(tree)
    result = cli("train", config, "data.min_ops=1", "data.max_ops=1", "data.n_train=20000")
    one_line(
        result, 2, r"data.n_train=20000: the built-in chain task has only \d+ distinct train problems with 1 to 1 operations"
    )
    assert not (tmp_path / "run").exists()


def test_non_utf8_yaml_names_the_line(cli, tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("student:\n  name: caf\xe9\n".encode("latin-1"))
    one_line(cli("train", config), 2, r"latin1.yaml:2: config file is not UTF-8 text \(byte 20\)")


def test_control_characters_in_an_error_line_are_made_harmless(cli, tree, write_yaml):
    """A key from a hostile config carries escape sequences; the printed line does not."""
    tree["train"]["\x1b[2J\x1b]0;owned\x07stepz"] = 3
    line = one_line(cli("train", write_yaml(tree)), 2, r"unknown key 'train.*stepz'")
    assert "\x1b" not in line and "\x07" not in line


def test_an_unwritable_out_dir_is_one_line(cli, tree, write_yaml, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    tree["out_dir"] = str(tmp_path / "a-file" / "run")
    one_line(cli("train", write_yaml(tree), "--no-eval"), 1, r"a-file/run: Not a directory")


def test_debug_shows_the_traceback_and_keeps_the_exit_code(cli, tree, write_yaml):
    config = write_yaml(tree)
    plain = cli("train", config, "train.weight_decay=-1")
    debug = cli("--debug", "train", config, "train.weight_decay=-1")
    assert plain.code == debug.code == 2
    assert "Traceback" not in plain.err and "Traceback (most recent call last)" in debug.err
    assert debug.err.strip().splitlines()[-1] == plain.err.strip().splitlines()[-1]  # the same one line, last
    assert cli("train", config, "train.weight_decay=-1", "--debug").code == 2  # anywhere on the line
