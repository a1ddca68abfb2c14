"""Students of another shape: layer drop, narrower, another family; `distill student`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.data.tasks.tokenizer import chain_tokenizer
from distill.errors import DistillError
from distill.models.loading import load_causal_lm
from distill.models.students import every_kth_layer, layer_drop_student, make_student, spread_layers

from helpers import TINY_TEACHER

DEEP = {**TINY_TEACHER, "num_hidden_layers": 6}


@pytest.fixture
def teacher_dir(tmp_path) -> Path:
    """A saved 6-layer random llama with the built-in tokenizer, as a user's teacher folder."""
    tok = chain_tokenizer()
    torch.manual_seed(0)
    model = load_causal_lm(config={**DEEP, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id})
    folder = tmp_path / "teacher"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _ids(n=2, t=9):
    return torch.randint(3, 20, (n, t), generator=torch.Generator().manual_seed(0))


def test_layer_choices():
    assert spread_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert spread_layers(6, 6) == list(range(6)) and spread_layers(6, 1) == [5]
    assert every_kth_layer(30, 3) == list(range(0, 30, 3))
    with pytest.raises(DistillError, match="--layers 7: the teacher has 6 layers"):
        spread_layers(6, 7)


def test_layer_drop_copies_the_chosen_layers(teacher_dir):
    teacher = load_causal_lm(str(teacher_dir))
    student = layer_drop_student(teacher, [0, 2, 5])
    assert student.config.num_hidden_layers == 3
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for new, old in enumerate([0, 2, 5]):
        for key, value in s_state.items():
            if key.startswith(f"model.layers.{new}."):
                torch.testing.assert_close(value, t_state[key.replace(f"layers.{new}.", f"layers.{old}.")], rtol=0, atol=0)
    for key in ("model.embed_tokens.weight", "model.norm.weight"):
        torch.testing.assert_close(s_state[key], t_state[key], rtol=0, atol=0)
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight  # still tied
    # the student is the teacher's computation with the other layers skipped
    ids = _ids()
    with torch.no_grad():
        h = teacher.model.embed_tokens(ids)
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        rope = teacher.model.rotary_emb(h, pos)
        mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
        for i in [0, 2, 5]:
            h = teacher.model.layers[i](h, attention_mask=mask, position_embeddings=rope, position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
        expected = teacher.lm_head(teacher.model.norm(h))
        torch.testing.assert_close(student(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_keeping_every_layer_reproduces_the_teacher(teacher_dir):
    teacher = load_causal_lm(str(teacher_dir))
    student = layer_drop_student(teacher, list(range(6)))
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, atol=0, rtol=0)


def test_dropped_student_generates_the_same_with_and_without_kv_cache(teacher_dir):
    student = layer_drop_student(load_causal_lm(str(teacher_dir)), [1, 4])
    ids = _ids(2, 5)
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = student.generate(ids, use_cache=True, **kwargs)
        plain = student.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, plain)


def test_per_layer_config_lists_follow_the_kept_layers():
    tok = chain_tokenizer()
    cfg = {"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
           "num_key_value_heads": 1, "intermediate_size": 64, "vocab_size": len(tok), "use_sliding_window": True,
           "sliding_window": 8, "max_window_layers": 2}  # fmt: skip
    teacher = load_causal_lm(config=cfg)
    types = list(teacher.config.layer_types)
    assert len(set(types)) == 2  # sliding and full attention layers
    student = layer_drop_student(teacher, [1, 3])
    assert student.config.layer_types == [types[1], types[3]]
    # a list that is not per layer, though as long as the stack, is left alone
    teacher.config.eos_token_id = [5, 6, 7, 8]
    assert layer_drop_student(teacher, [1, 3]).config.eos_token_id == [5, 6, 7, 8]


def test_cli_writes_a_student_transformers_loads(teacher_dir, tmp_path):
    out = tmp_path / "student"
    proc = subprocess.run(
        [sys.executable, "-m", "distill", "student", "--from", str(teacher_dir), "--layers", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["kept_layers"] == [0, 5] and record["init"] == "layer_drop"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    assert json.loads((out / "student.json").read_text())["params"] == record["params"]
    assert (out / "tokenizer.json").exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_narrower_and_other_family_students(teacher_dir, tmp_path):
    narrow = make_student(str(teacher_dir), tmp_path / "narrow", layers=3, hidden_size=16, heads=2, intermediate_size=32)
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "narrow")
    assert (m.config.hidden_size, m.config.num_hidden_layers, m.config.head_dim) == (16, 3, 8)
    assert narrow["init"] == "random"
    family = tmp_path / "qwen.json"
    family.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 24, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 48}))  # fmt: skip
    make_student(str(teacher_dir), tmp_path / "qwen", config_file=str(family))
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen")
    teacher = load_causal_lm(str(teacher_dir))
    assert q.config.model_type == "qwen2" and q.config.vocab_size == teacher.config.vocab_size


@pytest.mark.parametrize(
    "args, message",
    [
        (["--keep", "0,9"], "--keep: layer 9 does not exist; the teacher has layers 0..5"),
        (["--keep", "3,1"], "give distinct layers in increasing order"),
        (["--keep", "a,b"], "--keep 'a,b': give comma-separated layer numbers"),
        (["--layers", "2", "--every", "2"], "give at most one of --layers, --every, --keep"),
        (["--heads", "3", "--kv-heads", "2"], "3 attention heads are not a multiple of 2 key-value heads"),
        ([], "say what to change"),
    ],
)
def test_cli_errors_are_one_line(teacher_dir, tmp_path, args, message):
    out = tmp_path / "s"
    proc = subprocess.run(
        [sys.executable, "-m", "distill", "student", "--from", str(teacher_dir), "--out", str(out), *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists()


def test_existing_out_is_refused(teacher_dir, tmp_path):
    (tmp_path / "s").mkdir()
    with pytest.raises(DistillError, match="already exists"):
        make_student(str(teacher_dir), tmp_path / "s", layers=2)


def test_layer_drop_of_a_gemma3_style_model_with_two_attention_kinds():
    cfg = {"model_type": "gemma3_text", "hidden_size": 32, "num_hidden_layers": 6, "num_attention_heads": 2,
           "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 64, "vocab_size": 100,
           "sliding_window": 4, "sliding_window_pattern": 3}  # fmt: skip
    torch.manual_seed(0)
    teacher = load_causal_lm(config=cfg)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(layer_drop_student(teacher, list(range(6)))(ids).logits, teacher(ids).logits)
        student = layer_drop_student(teacher, [2, 4, 5])
        assert student.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
        kwargs = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(student.generate(ids[:, :5], use_cache=True, **kwargs), student.generate(ids[:, :5], use_cache=False, **kwargs))
