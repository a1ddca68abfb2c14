"""Helpers shared by the tests: tiny model configs, run-folder readers, a crash injector."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TINY_STUDENT = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
    "tie_word_embeddings": True,
}
TINY_TEACHER = {**TINY_STUDENT, "hidden_size": 48, "intermediate_size": 96}
TINY_QWEN2 = {**TINY_STUDENT, "model_type": "qwen2"}
# Gemma 3: a sliding-window layer (window 4, shorter than the test documents) then a full one.
TINY_GEMMA3 = {**TINY_STUDENT, "model_type": "gemma3_text", "head_dim": 16, "sliding_window": 4,
               "layer_types": ["sliding_attention", "full_attention"]}  # fmt: skip


def text_rows(n: int, seed: int = 0, words: tuple[int, int] = (2, 9)) -> list[dict]:
    """{"text"} rows of random lowercase words: the built-in character tokenizer reads them."""
    import random

    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 5)))

    return [{"text": " ".join(word() for _ in range(rng.randint(*words)))} for _ in range(n)]


def write_text_rows(path, n: int, seed: int = 0, words: tuple[int, int] = (2, 9)):
    """A JSONL file of `text_rows`; returns its path."""
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in text_rows(n, seed, words)))
    return path


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def student_weights(run_dir) -> dict[str, torch.Tensor]:
    """The exported student's weights of a run directory."""
    return load_file(str(Path(run_dir) / "student" / "model.safetensors"))


def assert_resumed_equals(full_dir, cut_dir, steps: int) -> None:
    """A run resumed after a crash logged steps 1..steps once each, with the uninterrupted
    run's losses and final student weights (1e-6)."""
    mf, mc = read_metrics(full_dir), read_metrics(cut_dir)
    assert [m["step"] for m in mc] == list(range(1, steps + 1))
    for x, y in zip(mf, mc):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6, rel=0)
    assert_same_students(full_dir, cut_dir, atol=1e-6)


def assert_same_students(a_dir, b_dir, atol: float) -> None:
    """The exported students of two runs hold the same weights (within atol)."""
    wa, wb = student_weights(a_dir), student_weights(b_dir)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=atol, rtol=0)


def train_in_two_processes(tree: dict, config_path, port: int, resume: bool = False, nodes: int = 1) -> None:
    """`distill train` of `tree` under torchrun: 2 gloo processes on this machine, one thread
    each, no evaluation; a failure shows the end of their stderr. resume: `--resume` the
    run's folder. nodes=2: a two-node rehearsal, two torchrun launchers of one process each
    meeting at a c10d rendezvous on localhost, as two machines would."""
    import os
    import subprocess
    import sys

    import yaml

    Path(config_path).write_text(yaml.safe_dump(tree))
    what = ["--resume", tree["out_dir"]] if resume else [str(config_path)]
    if nodes == 1:
        launch = ["--nproc_per_node", "2", "--master_port", str(port)]
    else:
        launch = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                  "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"rehearsal-{port}"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "distill", "train", *what, "--no-eval"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(nodes)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]


def crash_at(monkeypatch, step: int, run) -> None:
    """Call run() and make it crash (KeyboardInterrupt) right after optimizer step `step`
    is logged; the training loop is restored afterwards."""
    import distill.training.loop as train_mod

    real_update = train_mod.Progress.update

    def crash(self, done, loss, tps):
        real_update(self, done, loss, tps)
        if done == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod.Progress, "update", crash)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(train_mod.Progress, "update", real_update)


# A small chat template for the built-in character tokenizer (chat rows in unit tests): a
# turn is <|role|>content<eos> and a space (whitespace after the end-of-turn token, like
# ChatML's newline), a default system prompt when the conversation has none, user and
# assistant turns must alternate (raise_exception, as real templates do), and {% generation %}
# marks what an assistant turn must learn: transformers' assistant mask, to test against.
TINY_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|system|>be brief<eos> {% endif %}"
    "{% for m in messages %}"
    "{% if loop.index0 > 0 and m['role'] != 'system' and messages[loop.index0 - 1]['role'] == m['role'] %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] }}<eos>{% endgeneration %} "
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<eos> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHAT_ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]


def chat_tokenizer():
    """The built-in character tokenizer with role tokens and TINY_CHAT_TEMPLATE."""
    from distill.data.tasks.tokenizer import chain_tokenizer

    tok = chain_tokenizer()
    tok.add_tokens(CHAT_ROLE_TOKENS, special_tokens=True)
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def save_chat_tokenizer(folder) -> str:
    """`chat_tokenizer()` saved where a run config's `tokenizer:` can name it."""
    chat_tokenizer().save_pretrained(folder)
    return str(folder)


def chat_rows(n: int, seed: int = 0, turns: tuple[int, int] = (1, 2)) -> list[dict]:
    """{"messages"} rows the character tokenizer reads: user questions and assistant answers
    of random lowercase words, 1 or 2 exchanges (under 128 tokens), a system prompt on every third row."""
    import random

    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 4))) for _ in range(k))

    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": words(2)}] if i % 3 == 0 else []
        for _ in range(rng.randint(*turns)):
            messages += [{"role": "user", "content": words(rng.randint(1, 4))},
                         {"role": "assistant", "content": words(rng.randint(1, 5))}]  # fmt: skip
        rows.append({"messages": messages})
    return rows


def write_chat_rows(path, n: int, seed: int = 0) -> str:
    """A JSONL file of `chat_rows`; returns its path."""
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in chat_rows(n, seed)))
    return str(path)


BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (benchmarks/ on sys.path, as when it runs as a script,
    so it can import its sibling benchmarks)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
