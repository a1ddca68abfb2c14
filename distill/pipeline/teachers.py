"""`distill teachers`: score candidate teachers on the run's own rows before anything is trained.

Each candidate is a local model (hub id, folder, run folder, .gguf, `packaged:` alias) or a
model behind an OpenAI-compatible chat server (`URL#MODEL`, the client of `distill generate
--server`). On the same rows (`distill.eval.teacher_rows.read_samples`) every candidate gets:

    accuracy              greedy answers graded against the rows' gold answers (when they have any)
    heldout_ce, perplexity  nats per target token of its own tokenization (local candidates)
    bits_per_byte         the same nats over the targets' UTF-8 bytes: comparable across tokenizers
    agreement             mean share of rows on which its answer agrees with each other candidate's
                          (final answers on rows with a gold answer, the first words on the others)
    mean_words, mean_tokens  length of its greedy answers
    refusal_rate          answers matching eval.refusal_patterns
    params, forward_tokens_per_s, generate_tokens_per_s   cost, measured on this machine

A cell that cannot be filled is null in teachers.json with its reason under `na`. One
candidate is in memory at a time. Everything goes to OUT/teachers.json (written whole at the
end) and the table is printed; `distill report OUT` shows it as its "Teacher choice" section.
"""

import gc
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from distill import rundir
from distill.config import RunConfig, apply_override, build_config
from distill.errors import ConfigError
from distill.eval.teacher_rows import Sample, has_template, read_samples, server_messages
from distill.eval.teacher_scores import agreement_matrix, answer_stats, score_local
from distill.models.loading import check_model_source, count_parameters, load_causal_lm, load_tokenizer
from distill.paths import atomic_write_json, atomic_write_text
from distill.pipeline.chat_client import Reply, ServerSettings, complete_all
from distill.pipeline.generate import run_coroutine
from distill.report.report_data import finite

TEACHERS = rundir.TEACHERS
EXAMPLES = ("chat", "prose")
NO_LOGPROBS = "a chat-completions server returns no log-probabilities of given text"


@dataclass(frozen=True)
class TeacherSettings:
    rows: int = 32
    """Rows scored (the first of the held-out split, else of the training rows)."""
    max_new_tokens: int = 64
    """Most tokens of a greedy answer."""
    batch_size: int = 8
    """Rows per forward pass and per generation batch."""
    agreement_words: int = 8
    """Rows without gold answers: two answers agree when their first this many words match."""
    dtype: str = "float32"
    """Local candidates' weights: float32 or bfloat16."""
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 4
    timeout_s: float = 120.0
    max_retries: int = 3


@dataclass(frozen=True)
class Candidate:
    name: str  # as given
    source: str | None = None  # local: what the loaders read (a run folder's student/)
    server: ServerSettings | None = None


def parse_candidates(names: list[str], s: TeacherSettings) -> list[Candidate]:
    """Local names, run folders (their exported student/) and served `URL#MODEL` names."""
    if not names:
        raise ConfigError("give the candidates: --candidates A B C (local models, or URL#MODEL of a chat server)")
    seen = [n for i, n in enumerate(names) if n in names[:i]]
    if seen:
        raise ConfigError(f"candidate {seen[0]!r} is given twice")
    out = []
    for name in names:
        if name.startswith(("http://", "https://")):
            base, _, model = name.partition("#")
            if not model:
                raise ConfigError(f"served candidate {name!r}: give URL#MODEL, e.g. http://localhost:8000/v1#my-teacher")
            out.append(Candidate(name, server=ServerSettings(base, model, s.api_key_env, s.concurrency, s.timeout_s, s.max_retries)))
            continue
        student = Path(name) / rundir.STUDENT
        out.append(Candidate(name, source=str(student) if (student / "config.json").is_file() else name))
    return out


def machine() -> dict:
    """Where the speeds were measured."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"device": device, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def run_local(c: Candidate, samples: list[Sample], cfg: RunConfig, s: TeacherSettings) -> tuple[dict, list[str]]:
    t0 = time.perf_counter()
    model = load_causal_lm(name=c.source, dtype=s.dtype)  # first: a GGUF model caches its tokenizer too
    tokenizer = load_tokenizer(c.source)
    if torch.cuda.is_available():
        model.to("cuda")
    load_s = time.perf_counter() - t0
    try:
        record, texts = score_local(
            model, tokenizer, samples, c.name, cfg.data.max_length, cfg.data.cuts_long_rows, s.max_new_tokens, s.batch_size
        )
        record["params"] = count_parameters(model)
    finally:
        del model
        gc.collect()
    chat = any(x.kind == "chat" for x in samples)
    record |= {"kind": "local", "vocab": len(tokenizer), "load_s": load_s}
    record["template"] = ("own" if has_template(tokenizer) else "plain role lines (no chat template)") if chat else None
    return record, texts


def run_served(c: Candidate, samples: list[Sample], s: TeacherSettings) -> tuple[dict, list[str]]:
    """Greedy answers from a chat server. Speed: completion tokens per second of the whole
    concurrent exchange, as seen from here; a refused request (400, 413, 422) answers ''."""
    replies: dict[int, Reply] = {}

    def keep(key, reply: Reply) -> None:
        replies[key] = reply

    body = {"model": c.server.model, "temperature": 0.0, "max_tokens": s.max_new_tokens, "seed": 0, "n": 1}
    requests = [(i, {**body, "messages": server_messages(x)}, f"row {i + 1}") for i, x in enumerate(samples)]
    t0 = time.perf_counter()
    run_coroutine(complete_all(c.server, requests, keep))
    seconds = time.perf_counter() - t0
    ordered = [replies[i] for i in range(len(samples))]
    counts = [r.completion_tokens for r in ordered]
    made = sum(counts) if all(n is not None for n in counts) else None
    record = {
        "kind": "served", "params": None, "vocab": None, "template": "the server's", "load_s": None,
        "heldout_ce": None, "perplexity": None, "bits_per_byte": None, "scored_tokens": None, "target_bytes": None,
        "generated_tokens": made, "mean_tokens": made / len(ordered) if made is not None else None,
        "forward_tokens_per_s": None, "generate_tokens_per_s": made / seconds if made is not None and seconds > 0 else None,
        "forward_s": None, "generate_s": seconds, "refused": sum(r.error is not None for r in ordered),
    }  # fmt: skip
    return record, [r.text.strip() for r in ordered]


def na_reasons(record: dict, served: bool) -> dict[str, str]:
    """Why each empty cell is empty."""
    why: dict[str, str] = {}
    if record["accuracy"] is None:
        why["accuracy"] = "the rows have no gold answers"
    if served:
        why |= {k: NO_LOGPROBS for k in ("heldout_ce", "perplexity", "bits_per_byte")}
        why["params"] = "unknown for a served model"
        why["forward_tokens_per_s"] = "no teacher-forced pass on a server"
        if record["mean_tokens"] is None:
            why["mean_tokens"] = why["generate_tokens_per_s"] = "the server reports no token usage"
    return why


def answer_format(cfg: RunConfig) -> str:
    return "chain" if cfg.data.source == "builtin:chain" else cfg.eval.answer_format


def run_teachers(cfg: RunConfig, names: list[str], out: Path, s: TeacherSettings, config_label: str, progress: bool = True) -> dict:
    """Score every candidate on the run's rows; write OUT/teachers.json; return its tree."""
    candidates = parse_candidates(names, s)
    samples, where = read_samples(cfg, s.rows)
    for c in candidates:
        if c.source is not None:
            check_model_source(c.source)  # a typo in the last candidate fails now, not after the others ran
    fmt = answer_format(cfg)
    golds = [x.answer for x in samples]
    n_gold = sum(g is not None for g in golds)
    basis = "answer" if n_gold == len(golds) else "words" if n_gold == 0 else "mixed"
    results, texts = [], []
    for i, c in enumerate(candidates):
        if progress:
            print(f"teachers: {c.name} ({i + 1}/{len(candidates)}) on {len(samples)} rows", file=sys.stderr)
        if c.server is None:
            record, answers = run_local(c, samples, cfg, s)
        else:
            record, answers = run_served(c, samples, s)
        record |= answer_stats(samples, answers, fmt, cfg.eval.refusal_patterns)
        record["na"] = na_reasons(record, c.server is not None)
        shown = [{"row": k + 1, "answer": a, "gold": x.answer} for k, (x, a) in enumerate(zip(samples, answers))][:3]
        results.append({"name": c.name, **record, "samples": shown})
        texts.append(answers)
    matrix = agreement_matrix(texts, golds, s.agreement_words, fmt)
    for i, r in enumerate(results):
        others = [v for j, v in enumerate(matrix[i]) if j != i and v is not None]
        r["agreement"] = sum(others) / len(others) if others else None
        if r["agreement"] is None:
            r["na"]["agreement"] = "one candidate only"
    kinds = sorted({x.kind for x in samples})
    result = {
        "config": config_label,
        "data": {"rows": len(samples), "from": where, "kinds": kinds, "with_answers": n_gold,
                 "answer_format": fmt if n_gold else None},
        "settings": {k: v for k, v in asdict(s).items() if k not in ("api_key_env", "timeout_s", "max_retries")},
        "machine": machine(),
        "agreement": {"basis": basis, "answer_rows": n_gold, "words": s.agreement_words if basis != "answer" else None,
                      "names": [c.name for c in candidates], "matrix": matrix},
        "candidates": results,
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / TEACHERS, finite(result))
    return finite(result)


def _cell(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"


def _share(v) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def teachers_table(result: dict) -> Table:
    """The candidates side by side (n/a cells are explained under the table by `na_notes`)."""
    data = result["data"]
    table = Table(title=f"teacher candidates on {data['rows']} rows of {data['from']}")
    heads = ["candidate", "params", "accuracy", "CE nats/tok", "ppl", "bits/byte", "agreement", "words", "tokens",
             "refusals", "fwd tok/s", "gen tok/s"]  # fmt: skip
    for h in heads:
        table.add_column(h, justify="left" if h == "candidate" else "right")
    for r in result["candidates"]:
        params = None if r["params"] is None else f"{r['params'] / 1e6:.1f}M"
        table.add_row(
            r["name"], params or "n/a", _share(r["accuracy"]), _cell(r["heldout_ce"]), _cell(r["perplexity"]),
            _cell(r["bits_per_byte"]), _share(r["agreement"]), _cell(r["mean_words"]), _cell(r["mean_tokens"]),
            _share(r["refusal_rate"]), _cell(r["forward_tokens_per_s"]), _cell(r["generate_tokens_per_s"]),
        )  # fmt: skip
    return table


def na_notes(result: dict) -> list[str]:
    """One line per candidate with empty cells: which and why."""
    lines = []
    for r in result["candidates"]:
        by_reason: dict[str, list[str]] = {}
        for key, why in r["na"].items():
            by_reason.setdefault(why, []).append(key)
        lines += [f"{r['name']}: {', '.join(keys)} n/a: {why}" for why, keys in by_reason.items()]
    return lines


def print_result(result: dict, path: Path) -> None:
    console = Console()
    console.print(teachers_table(result))
    a, fmt = result["agreement"], result["data"]["answer_format"]
    rule = {"answer": f"final answers ({fmt})", "words": f"the first {a['words']} words",
            "mixed": f"final answers ({fmt}) on the {a['answer_rows']} rows with one, the first {a['words']} words on the rest"}[a["basis"]]  # fmt: skip
    console.print(f"agreement: on {rule}; CE is per token of each candidate's own tokenizer, bits/byte compares across tokenizers")
    m = result["machine"]
    console.print(f"speed measured on {m['device']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads)")
    for line in na_notes(result):
        console.print(line, markup=False)
    print(f"wrote {path}")


def example_file(name: str) -> Path:
    return Path(str(resources.files("distill") / "configs" / name))


def example_config(name: str, out: Path, overrides: list[str]) -> RunConfig:
    """A config for `--example`: 'chat', the packaged chat conversations (configs/chat_small.jsonl),
    or 'prose', paragraphs of CPython's language reference written to OUT/data/prose.jsonl."""
    if name not in EXAMPLES:
        raise ConfigError(f"--example {name!r}: one of {', '.join(EXAMPLES)}")
    if name == "chat":
        source = example_file("chat_small.jsonl")
    else:
        from distill.pipeline.demo_real import spread, train_paragraphs

        source = out / "data" / "prose.jsonl"
        atomic_write_text(source, "".join(json.dumps({"text": t}) + "\n" for t in spread(train_paragraphs(), 48)))
    tree = {
        "student": {"name": "packaged:smollm2-135m-instruct"},  # not loaded: the command reads the data section
        "data": {"source": str(source), "eval_source": str(source), "max_length": 512},
        "objective": {"alpha": 0.0},
        "out_dir": str(out),
    }
    for item in overrides:
        apply_override(tree, item)
    return build_config(tree, f"--example {name}")


def check_settings(s: TeacherSettings) -> None:
    if min(s.rows, s.max_new_tokens, s.batch_size, s.agreement_words, s.concurrency) < 1:
        raise ConfigError("--rows, --max-new-tokens, --batch-size, --agreement-words and --concurrency must be at least 1")
    if s.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--dtype {s.dtype!r}: float32 or bfloat16")
    if s.timeout_s <= 0 or s.max_retries < 0:
        raise ConfigError("--timeout must be > 0 and --max-retries >= 0")


def teachers_command(config: str | None, overrides: list[str], example: str | None, names: list[str],
                     out: str | None, s: TeacherSettings) -> dict:  # fmt: skip
    """The CLI's work: the config (a file or --example), the scores, teachers.json, the table."""
    from distill.config import load_config

    check_settings(s)
    if example is not None:
        target = Path(out or f"distill-teachers-{example}")
        cfg = example_config(example, target, overrides)
        label = f"--example {example}"
    elif config is None:
        raise ConfigError("give a run config YAML (its data is scored), or --example chat|prose")
    else:
        cfg = load_config(config, overrides)
        target, label = Path(out or cfg.out_dir), config
    result = run_teachers(cfg, names, target, s, label)
    print_result(result, target / TEACHERS)
    return result
