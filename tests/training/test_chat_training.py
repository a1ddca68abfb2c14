"""Chat rows through every path: training (plain CE and live-teacher KD), the teacher cache,
on-policy sampling, evaluation, and `distill generate` (local and server teachers)."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from distill.config import build_config
from distill.data.build import build_examples
from distill.data.chat import generation_prompt
from distill.data.rows import IGNORE_INDEX, collate, global_batch_indices, read_jsonl, tokenize_rows
from distill.models.build import build_models, build_tokenizer
from distill.pipeline.cache import write_teacher_cache
from distill.pipeline.curate import CurateSettings, write_curated
from distill.pipeline.generate import GenerateSettings, run_generate
from distill.pipeline.runner import run_training
from distill.training.loop import train
from distill.training.on_policy import prompt_length, sample_examples

from chat_server import ChatServer
from helpers import TINY_STUDENT, TINY_TEACHER, chat_tokenizer, read_metrics, save_chat_tokenizer, write_chat_rows


@pytest.fixture
def chat_tree(tmp_path) -> dict:
    """A tiny run on chat rows: tiny llama teacher and student with the chat tokenizer."""
    tok = save_chat_tokenizer(tmp_path / "tok")
    return {
        "student": {"config": TINY_STUDENT, "tokenizer": tok},
        "teacher": {"config": TINY_TEACHER, "tokenizer": tok},
        "data": {"source": write_chat_rows(tmp_path / "chat.jsonl", 24), "max_length": 128},
        "objective": {"alpha": 0.5, "temperature": 2.0, "fused": False},
        "train": {"steps": 3, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 1},
        "eval": {"max_new_tokens": 6, "batch_size": 4, "teacher": False},
        "out_dir": str(tmp_path / "run"),
    }


def test_task_ce_is_the_mean_over_assistant_tokens(chat_tree):
    """Plain CE on chat rows: step 1's task_ce and valid_tokens are those of the initial
    student on exactly the assistant tokens of the step's rows."""
    tree = copy.deepcopy(chat_tree)
    tree["objective"]["alpha"] = 0.0
    del tree["teacher"]
    cfg = build_config(tree)
    train(cfg, show_progress=False)
    first = read_metrics(cfg.out_dir)[0]

    student, _, tok, _ = build_models(cfg)  # the same seed: the run's initial weights
    examples = build_examples(cfg.data, tok)
    b = collate([examples[i] for i in global_batch_indices(0, len(examples), 4, cfg.train.seed)], tok.pad_token_id)
    with torch.no_grad():
        logits = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # (B, T, V)
    targets = b["labels"][:, 1:]  # (B, T-1)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    assert first["valid_tokens"] == int((targets != IGNORE_INDEX).sum())
    assert first["task_ce"] == pytest.approx(ce.item(), rel=1e-5)
    roles = [tok.convert_tokens_to_ids(t) for t in ("<|system|>", "<|user|>", "<|assistant|>")]
    assert not any(int(x) in roles for x in targets[targets != IGNORE_INDEX])  # headers are never targets


def test_kd_run_from_the_cache_equals_the_live_teacher_and_evaluates(chat_tree, tmp_path):
    """Live-teacher KD on chat rows, then `distill cache` of the same rows at k = V: the same
    metrics; the run's evaluation asks the student the held-out conversations."""
    live = copy.deepcopy(chat_tree)
    live["data"]["eval_source"] = write_chat_rows(tmp_path / "held.jsonl", 4, seed=9)
    result = run_training(build_config(live), show_progress=False)
    assert result["eval"]["n"] == 4 and result["eval"]["heldout_ce"] > 0

    cfg = build_config(chat_tree)
    vocab = len(build_tokenizer(cfg.teacher, "teacher"))
    manifest = write_teacher_cache(cfg, tmp_path / "cache", vocab, "float32", 16, batch_size=8, show_progress=False)
    examples = build_examples(cfg.data, build_tokenizer(cfg.student, "student"))
    assert sum(s["tokens"] for s in manifest["shards"]) == sum(sum(x != IGNORE_INDEX for x in e.labels[1:]) for e in examples)
    cached = copy.deepcopy(chat_tree)
    cached.update(teacher_cache=str(tmp_path / "cache"), out_dir=str(tmp_path / "cached"))
    train(build_config(cached), show_progress=False)
    for a, b in zip(read_metrics(live["out_dir"]), read_metrics(cached["out_dir"]), strict=True):
        for key in ("loss", "task_ce", "kd"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_on_policy_student_continues_the_conversation(chat_tree, tmp_path):
    tok = chat_tokenizer()
    rows = read_jsonl(chat_tree["data"]["source"])
    examples = tokenize_rows(rows, tok, 128)
    cfg = build_config({**chat_tree, "on_policy": {"lmbda": 1.0, "max_new_tokens": 6}})
    student = build_models(cfg)[0]
    sampled, _ = sample_examples(student, examples, [0, 1, 2], cfg.on_policy, tok.eos_token_id, tok.pad_token_id, 0, 0)
    for i, s in zip([0, 1, 2], sampled):
        asked = tok(generation_prompt(tok, rows[i].messages, "t"), add_special_tokens=False).input_ids
        n = prompt_length(examples[i])
        assert examples[i].input_ids[:n] == asked == s.input_ids[:n]  # every earlier turn is context
        assert s.labels[:n] == [IGNORE_INDEX] * n and s.labels[n:] == s.input_ids[n:] and len(s.input_ids) > n
    train(cfg, show_progress=False)
    metrics = read_metrics(cfg.out_dir)
    assert all(m["on_policy"] and m["generated_tokens"] > 0 for m in metrics)


def chat_prompts(path) -> str:
    rows = [
        {"messages": [{"role": "user", "content": "add one"}], "answer": "1"},
        {"messages": [{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "ho"}, {"role": "user", "content": "again"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "old answer"}]},
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def chat_teacher(tmp_path):
    """A tiny llama saved with the chat tokenizer: a local chat teacher."""
    from distill.models.loading import load_causal_lm

    tok = chat_tokenizer()
    torch.manual_seed(0)
    config = {**TINY_STUDENT, "vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    model = load_causal_lm(config=config)
    model.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    return model, tok, str(tmp_path / "teacher")


def test_generate_answers_the_conversation_so_far(chat_teacher, tmp_path):
    _, tok, folder = chat_teacher
    settings = GenerateSettings(temperature=1.0, max_new_tokens=8, samples=1, seed=1, system="sys")
    run_generate(chat_prompts(tmp_path / "p.jsonl"), tmp_path / "out", settings, teacher=folder, progress=False)
    rows = sorted((json.loads(x) for x in (tmp_path / "out" / "generations.jsonl").read_text().splitlines()),
                  key=lambda r: r["index"])  # fmt: skip
    asked = [
        [{"role": "system", "content": "sys"}, {"role": "user", "content": "add one"}],
        [{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "ho"}, {"role": "user", "content": "again"}],
        [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}],  # the old answer is written anew
    ]  # fmt: skip
    for r, conversation in zip(rows, asked, strict=True):
        assert r["messages"] == conversation + [{"role": "assistant", "content": r["completion"]}]
        prompt = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert r["prompt_tokens"] == len(tok(prompt, add_special_tokens=False).input_ids)
        assert r["prompt"] == conversation[-1]["content"]
    assert rows[0]["answer"] == "1"
    training = read_jsonl(tmp_path / "out" / "generations.jsonl")  # the output trains as chat rows
    assert all(t.messages is not None for t in training)
    assert len(tokenize_rows(training, tok, 256)) == 3
    write_curated(tmp_path / "out", tmp_path / "cur" / "curated.jsonl", CurateSettings(min_chars=0))
    curated = [json.loads(x) for name in ("curated.jsonl", "rejected.jsonl") for x in (tmp_path / "cur" / name).read_text().splitlines()]
    assert sorted(json.dumps(r["messages"]) for r in curated) == sorted(json.dumps(r["messages"]) for r in rows)


def test_server_teacher_gets_the_conversation(tmp_path):
    from distill.pipeline.chat_client import ServerSettings

    from chat_server import tiny_chat_model

    with ChatServer(*tiny_chat_model()) as server:
        settings = ServerSettings(server.url, "tiny", concurrency=1, timeout_s=5.0)
        run_generate(chat_prompts(tmp_path / "p.jsonl"), tmp_path / "out", GenerateSettings(max_new_tokens=4), server=settings,
                     progress=False)  # fmt: skip
        sent = sorted((r["body"]["messages"] for r in server.requests), key=len)
    assert sent[-1] == [{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "ho"}, {"role": "user", "content": "again"}]  # fmt: skip
    assert [{"role": "user", "content": "q"}] in sent


def test_chat_prompts_need_a_template_and_a_user_turn_last(tmp_path):
    from distill.data.tasks.tokenizer import chain_tokenizer
    from distill.errors import ConfigError, DistillError
    from distill.models.loading import load_causal_lm

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "system", "content": "s"}]}) + "\n")
    with pytest.raises(DistillError, match="bad.jsonl:1: a chat prompt must end with a user turn"):
        run_generate(str(bad), tmp_path / "o1", GenerateSettings(), teacher="unused", progress=False)
    tok = chain_tokenizer()
    load_causal_lm(config={**TINY_STUDENT, "vocab_size": len(tok)}).save_pretrained(tmp_path / "plain")
    tok.save_pretrained(tmp_path / "plain")
    with pytest.raises(ConfigError, match="chat prompts .* need the chat template"):
        run_generate(chat_prompts(tmp_path / "p.jsonl"), tmp_path / "o2", GenerateSettings(), teacher=str(tmp_path / "plain"),
                     progress=False)  # fmt: skip


def test_cli_names_the_row_the_template_refuses(chat_tree, tmp_path):
    """Through the real command: one error line naming the file and row, exit 1, no run written."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    rows = [json.loads(x) for x in Path(chat_tree["data"]["source"]).read_text().splitlines()][:3]
    rows[1]["messages"].insert(1, {"role": "user", "content": "twice"})  # user, user: the template refuses
    chat_tree["data"]["source"] = str(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(chat_tree))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "distill", "train", str(tmp_path / "run.yaml")]
    proc = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr
    assert "bad.jsonl: row 2: the chat template refuses this conversation: Conversation roles must alternate" in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
