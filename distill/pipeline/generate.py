"""`distill generate`: a teacher writes a rationale and an answer for each prompt.

Two backends, one output. A local transformers teacher samples in batches with a KV cache
(`distill.training.rollout`); a teacher behind any OpenAI-compatible server is asked concurrently
(`distill.pipeline.chat_client`). Either way each (prompt, sample) becomes one JSONL row:

    {"key", "index", "prompt", "prompt_hash", "sample", "answer" (gold or null), "teacher",
     "sampling" (temperature, top_p, top_k, max_new_tokens, seed), "completion",
     "finish_reason", "prompt_tokens", "completion_tokens", "seconds"}

in OUT/generations.jsonl, beside OUT/generate.json (the settings) and OUT/budget.json.

A prompt row may be a chat row, {"messages": [...]}: the teacher answers the conversation so
far (a last assistant turn is dropped and written anew), and the row also carries
"messages", the conversation with the teacher's turn appended: a training row as it stands.

Resumable: a row is appended whole, right after its reply, and a rerun of the same command
skips every key already in the file; a line that a kill cut in half is dropped from the
tail first. Each row's sampling seed comes from (seed, prompt hash, sample), so a resumed
run writes what an uninterrupted one would have.
"""

import asyncio
import concurrent.futures
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from distill import rundir, seeds
from distill.budget import forward_flops, record_phase
from distill.errors import ConfigError, DistillError
from distill.eval.evaluate import load_student
from distill.models.loading import count_parameters
from distill.paths import atomic_write_json, read_json
from distill.pipeline.chat_client import Reply, ServerSettings, complete_all
from distill.pipeline.prompts import Prompt, prompt_hash, read_prompts
from distill.training.rollout import Sampling, rollout

OUTPUT = "generations.jsonl"


@dataclass(frozen=True)
class GenerateSettings:
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    samples: int = 1
    """Samples per prompt (self-consistency in `distill curate` votes over them)."""
    seed: int = 0
    system: str | None = None
    """A system message; None: the chat template's own default."""


class RowFile:
    """An append-only JSONL file that survives kill -9: on open, a half-written last line is
    cut off and the keys of the whole lines are read; each append is one whole line."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.keys: set[str] = set()
        self.rows: list[dict] = []
        if self.path.exists():
            data = self.path.read_bytes()
            whole = data[: data.rfind(b"\n") + 1]
            if len(whole) < len(data):
                print(f"{self.path}: dropped a half-written last line ({len(data) - len(whole)} bytes)", file=sys.stderr)
                with open(self.path, "r+b") as f:
                    f.truncate(len(whole))
            for lineno, line in enumerate(whole.split(b"\n")[:-1], 1):  # U+2028 is not a line end
                try:
                    row = json.loads(line.decode("utf-8"))
                    key = row["key"]
                    if not isinstance(key, str):
                        raise TypeError
                except (ValueError, KeyError, TypeError, RecursionError):  # not UTF-8, not JSON, no key
                    raise DistillError(f"{self.path}:{lineno}: not a generation row; move the file aside") from None
                self.keys.add(key)
                self.rows.append(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def append(self, row: dict) -> None:
        if row["key"] in self.keys:
            return
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        self.keys.add(row["key"])
        self.rows.append(row)

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


@dataclass(frozen=True)
class Job:
    prompt: Prompt
    phash: str
    sample: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.phash}:{self.sample}"


def make_row(job: Job, reply: Reply, teacher: str, s: GenerateSettings) -> dict:
    sampling = {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "max_new_tokens": s.max_new_tokens}
    return {
        "key": job.key,
        "index": job.prompt.index,
        "prompt": job.prompt.prompt,
        "prompt_hash": job.phash,
        "sample": job.sample,
        "answer": job.prompt.answer,
        "teacher": teacher,
        "sampling": {**sampling, "seed": job.seed},
        "completion": reply.text,
        "finish_reason": reply.finish_reason,
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "seconds": round(reply.seconds, 4),
        "retries": reply.retries,
        **({"error": reply.error} if reply.error else {}),
        **({"messages": job.prompt.conversation(s.system) + [{"role": "assistant", "content": reply.text}]}
           if job.prompt.messages is not None and not reply.error else {}),
    }  # fmt: skip


class LocalTeacher:
    """A transformers model that samples in batches (KV cache, one seed per row)."""

    def __init__(self, name: str, chat_template: bool | None, dtype: str = "float32"):
        self.model, self.tokenizer = load_student(name)
        if dtype == "bfloat16":
            self.model.to(torch.bfloat16)
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.params = count_parameters(self.model)
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if chat_template and not has_template:
            raise ConfigError(f"--chat-template: the tokenizer of {name} has no chat template")
        self.chat = has_template if chat_template is None else chat_template
        if self.tokenizer.eos_token_id is None:
            raise DistillError(f"the tokenizer of {name} has no eos_token: generations could never end")
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def encode(self, prompt: Prompt, system: str | None) -> list[int]:
        if not self.chat:
            return self.tokenizer(prompt.prompt, add_special_tokens=False).input_ids
        text = self.tokenizer.apply_chat_template(prompt.conversation(system), tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def replies(self, jobs: list[Job], s: GenerateSettings) -> list[Reply]:
        sampling = Sampling(s.max_new_tokens, s.temperature, s.top_k, s.top_p)
        ids = [self.encode(j.prompt, s.system) for j in jobs]
        t0 = time.perf_counter()
        done = rollout(self.model, ids, sampling, self.tokenizer.eos_token_id, self.pad, [j.seed for j in jobs])
        share = (time.perf_counter() - t0) / len(jobs)
        texts = self.tokenizer.batch_decode(done.completions, skip_special_tokens=True)
        return [
            Reply(text, "stop" if ended else "length", len(p), len(c), share, 0)
            for text, ended, p, c in zip(texts, done.ended, ids, done.completions)
        ]


def server_body(settings: ServerSettings, job: Job, s: GenerateSettings) -> dict:
    body = {
        "model": settings.model,
        "messages": job.prompt.conversation(s.system),
        "temperature": s.temperature,
        "top_p": s.top_p,
        "max_tokens": s.max_new_tokens,
        "seed": job.seed,
        "n": 1,
    }
    if s.top_k:
        body["top_k"] = s.top_k  # vLLM and SGLang accept it; OpenAI does not
    return body


def check_settings(out: Path, meta: dict, has_rows: bool) -> None:
    """A rerun must ask for what the existing rows were written with (with no rows yet, the
    new settings replace the old: a run that failed at once can be corrected)."""
    path = out / "generate.json"
    if not path.exists() or not has_rows:
        atomic_write_json(path, meta)
        return
    old = read_json(path, "generation settings")
    for key in sorted(set(old) | set(meta)):
        if old.get(key) != meta.get(key):
            raise ConfigError(
                f"{path}: this output was written with {key}={old.get(key)!r}, the command asks "
                f"{meta.get(key)!r}; resume with the same settings or choose another --out"
            )


@dataclass
class _Tally:
    """What one `run_generate` call has done so far (read after a failure too)."""

    total: int  # jobs, those already in the file included
    skipped: int  # jobs already in the file
    params: int | None  # the teacher's parameter count, where known
    written: int = 0
    retries: int = 0


def check_arguments(settings: GenerateSettings, teacher: str | None, server: ServerSettings | None, batch_size: int) -> None:
    if (teacher is None) == (server is None):
        raise ConfigError("give exactly one teacher: --teacher (a local model) or --server URL with --model")
    if settings.samples < 1 or settings.max_new_tokens < 1 or batch_size < 1:
        raise ConfigError("--samples, --max-new-tokens and --batch-size must be at least 1")
    if settings.temperature < 0 or not 0 < settings.top_p <= 1:
        raise ConfigError("--temperature must be >= 0 and --top-p in (0, 1]")


def open_rows(out: Path, meta: dict) -> RowFile:
    """OUT/generations.jsonl, after checking a rerun asks for what its rows were written with."""
    rows = RowFile(out / OUTPUT)
    try:
        check_settings(out, meta, has_rows=bool(rows.rows))
    except BaseException:
        rows.close()
        raise
    return rows


def make_jobs(prompts: list[Prompt], settings: GenerateSettings) -> list[Job]:
    """`settings.samples` jobs per distinct prompt, each with its own sampling seed."""
    jobs, seen = [], set()
    for p in prompts:
        phash = prompt_hash(p.identity, settings.system)
        if phash in seen:
            continue  # a repeated prompt is generated once
        seen.add(phash)
        jobs += [Job(p, phash, k, seeds.generation_row(settings.seed, phash, k)) for k in range(settings.samples)]
    return jobs


def generate_local(
    todo: list[Job],
    rows: RowFile,
    tally: _Tally,
    teacher: str,
    teacher_id: str,
    settings: GenerateSettings,
    chat_template: bool | None,
    dtype: str,
    batch_size: int,
    progress: bool,
) -> None:
    """Sample the jobs with a local transformers teacher, a batch at a time; append each row."""
    local = LocalTeacher(teacher, chat_template, dtype)
    tally.params = local.params
    if not local.chat and any(j.prompt.messages is not None for j in todo):
        raise ConfigError(f"chat prompts ({{\"messages\"}}) need the chat template of {teacher}: it has none, or --no-chat-template")
    todo = sorted(todo, key=lambda j: len(j.prompt.identity))  # similar lengths share a batch: less padding
    for i in range(0, len(todo), batch_size):
        batch = todo[i : i + batch_size]
        for job, reply in zip(batch, local.replies(batch, settings)):
            rows.append(make_row(job, reply, teacher_id, settings))
            tally.written += 1
        if progress:
            print(f"generate: {tally.skipped + tally.written}/{tally.total} rows", file=sys.stderr)


def generate_remote(
    todo: list[Job],
    rows: RowFile,
    tally: _Tally,
    server: ServerSettings,
    teacher_id: str,
    settings: GenerateSettings,
    progress: bool,
) -> None:
    """Ask the server for every job concurrently; append each row as its reply comes."""
    by_key = {j.key: j for j in todo}

    def on_reply(key, reply: Reply) -> None:
        rows.append(make_row(by_key[key], reply, teacher_id, settings))
        tally.written += 1
        tally.retries += reply.retries
        if progress and (tally.written % max(1, len(todo) // 20) == 0 or tally.written == len(todo)):
            print(f"generate: {tally.skipped + tally.written}/{tally.total} rows, {tally.retries} retries", file=sys.stderr)

    requests = [(j.key, server_body(server, j, settings), f"prompt {j.prompt.index + 1} sample {j.sample}") for j in todo]
    run_coroutine(complete_all(server, requests, on_reply))


def run_generate(
    prompts_source: str,
    out: Path,
    settings: GenerateSettings,
    teacher: str | None = None,
    server: ServerSettings | None = None,
    n: int | None = None,
    batch_size: int = 16,
    chat_template: bool | None = None,
    dtype: str = "float32",
    teacher_params: int | None = None,
    progress: bool = True,
    split: str | None = None,
    columns: dict[str, str] | None = None,
) -> dict:
    """Generate what is missing from OUT/generations.jsonl; returns a summary."""
    check_arguments(settings, teacher, server, batch_size)
    prompts = read_prompts(prompts_source, n, split, columns)
    out = Path(out)
    teacher_id = teacher if teacher is not None else f"{server.base_url.rstrip('/')}#{server.model}"
    meta = {
        "teacher": teacher_id,
        "backend": "local" if teacher is not None else "server",
        "sampling": {k: v for k, v in asdict(settings).items() if k != "system"},
        "system": settings.system,
        "chat_template": chat_template,
        "dtype": dtype if teacher is not None else None,
    }
    out.mkdir(parents=True, exist_ok=True)
    rows = open_rows(out, meta)
    jobs = make_jobs(prompts, settings)
    todo = [j for j in jobs if j.key not in rows.keys]
    tally = _Tally(total=len(jobs), skipped=len(jobs) - len(todo), params=teacher_params)
    t0 = time.perf_counter()
    try:
        if teacher is not None:
            generate_local(todo, rows, tally, teacher, teacher_id, settings, chat_template, dtype, batch_size, progress)
        else:
            generate_remote(todo, rows, tally, server, teacher_id, settings, progress)
    finally:
        rows.close()
        seconds = time.perf_counter() - t0
        totals = token_totals(rows.rows, tally.params)
        add = {"seconds": seconds, "retries": tally.retries}
        record_phase(out / rundir.BUDGET, "teacher_generation", add=add, totals=totals)
    return {
        "out": str(out), "rows": len(rows.rows), "written": tally.written, "already_there": tally.skipped,
        "seconds": seconds, **totals,
    }  # fmt: skip


def run_coroutine(coro):
    """asyncio.run, also from a thread whose event loop is already running (a notebook, or a
    Playwright session): then the coroutine runs to completion on a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def token_totals(rows: list[dict], params: int | None) -> dict:
    """Token counts of all rows so far (a server that reports no usage leaves them unknown)."""
    def total(key: str) -> int | None:
        values = [r.get(key) for r in rows]
        known = all(isinstance(v, int) and not isinstance(v, bool) for v in values)  # rows of older versions too
        return sum(values) if known else None

    p, c = total("prompt_tokens"), total("completion_tokens")
    tokens = None if p is None or c is None else p + c
    return {
        "rows": len(rows),
        "prompt_tokens": p,
        "completion_tokens": c,
        "tokens": tokens,
        "flops": None if tokens is None else forward_flops(params, tokens),
        "teacher_params": params,
    }
