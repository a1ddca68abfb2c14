"""Run-level steps shared by the CLI and the demo: train then evaluate, evaluate a run."""

import os
from pathlib import Path

import torch

from distill import rundir
from distill.budget import record_phase
from distill.config import RunConfig, load_config
from distill.data.build import build_rows
from distill.data.rationale import eval_rows
from distill.data.rows import is_text, tokenize_rows
from distill.data.tasks import chain
from distill.errors import ConfigError, DistillError
from distill.eval.cross_scores import cross_scores
from distill.eval.evaluate import evaluate_rows, load_student
from distill.eval.gates import check_gates
from distill.eval.text import evaluate_text
from distill.eval.truth import truth_scores
from distill.models.build import build_teacher
from distill.models.quantize import SCHEMES
from distill.paths import atomic_write_json
from distill.training.cross_teacher import Retokenizer
from distill.training.loop import train


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def load_eval_teacher(cfg: RunConfig, tokenizer, student):
    """The run's teacher for evaluation (as training builds it), its tokenizer and the shared
    vocabulary size; (None, None, None) without a teacher or with eval.teacher=false."""
    if cfg.teacher is None or not cfg.eval.teacher:
        return None, None, None
    teacher, t_tok, vocab = build_teacher(cfg, tokenizer, student)
    return teacher.to(next(student.parameters()).device), t_tok, vocab


def default_format_regex(cfg: RunConfig) -> str | None:
    """eval.format_regex, else the built-in task's own format (the answer digit alone for the
    label task of answer_only / multitask), else None (format adherence not measured)."""
    if cfg.eval.format_regex is not None or cfg.data.source != "builtin:chain":
        return cfg.eval.format_regex
    if cfg.eval.format_json_schema is not None:
        return None
    return chain.FORMAT_REGEX if cfg.rationale.mode == "completion" else chain.ANSWER_REGEX


def model_record(model, folder: Path | None) -> dict:
    """eval.json's `model`: which student was evaluated, and its quantization (or null)."""
    quant = getattr(model, "distill_quant", None)
    keys = ("scheme", "bits", "group_size", "activations", "weights_bytes", "fp_weights_bytes")
    return {"folder": None if folder is None else str(folder), "quant": {k: quant.get(k) for k in keys} if quant else None}


def evaluate_run(cfg: RunConfig, model, tokenizer, run_dir: Path | None, folder: Path | None = None) -> dict:
    """Evaluate `model` (loaded from `folder`) on the run's held-out split (with the run's
    teacher when it has one) and check its gates; in a run directory, write eval.json (for a
    quantized student eval-<scheme>.json) and the evaluation's budget."""
    rows = eval_rows(build_rows(cfg.data, "test"), cfg.rationale)
    gates = cfg.gates.expressions()
    if not rows:  # nothing to evaluate on: every gate fails for want of its metric
        return {"n": 0, "model": model_record(model, folder), **({"gates": check_gates(gates, {})} if gates else {})}
    d = cfg.data
    if torch.cuda.is_available() and cfg.train.device == "auto":
        model.to("cuda")  # the teacher follows the student's device
    teacher, t_tok, vocab = load_eval_teacher(cfg, tokenizer, model)
    cross = None
    if teacher is not None and cfg.objective.cross_tokenizer is not None:  # never feed it the student's ids
        cross, teacher, t_tok, vocab = (teacher, Retokenizer(t_tok, tokenizer)), None, None, len(tokenizer)
    if is_text(rows) and not d.source.startswith("builtin:"):  # {"text"} rows: no prompt, no answer
        result, usage = evaluate_text(model, tokenizer, rows, cfg.eval, d.max_length, d.cuts_long_rows, teacher, vocab)
        scored = result["text"]  # what the gates read
    else:
        fmt = "chain" if d.source == "builtin:chain" else cfg.eval.answer_format
        direct = cfg.rationale.mode != "completion"
        task = (fmt, direct, default_format_regex(cfg))  # where the answer is, and the format checked
        result, usage = evaluate_rows(
            model, tokenizer, rows, cfg.eval, d.max_length, *task, teacher, t_tok, vocab, truncate=d.cuts_long_rows
        )
        scored = result
    if cross is not None:  # the teacher of another tokenizer, compared where the texts align
        examples = tokenize_rows(rows, tokenizer, d.max_length, "held-out rows", d.cuts_long_rows)
        result["cross_teacher"] = cross_scores(model, *cross, examples, cfg.eval.batch_size, vocab, tokenizer.pad_token_id)
    if d.source == "builtin:grammar":  # the true distribution is known: score against it
        result["truth"] = truth_scores(model, tokenizer, rows, d.seed, cfg.eval.batch_size, d.max_length, teacher)
    if gates:
        result["gates"] = check_gates(gates, scored)
    result["model"] = model_record(model, folder)
    if run_dir is not None:
        scheme = (getattr(model, "distill_quant", None) or {}).get("scheme")
        atomic_write_json(run_dir / rundir.eval_name(scheme), result)
        record_phase(run_dir / rundir.BUDGET, "evaluation", add=usage)
    return result


def run_training(cfg: RunConfig, resume: bool = False, evaluate: bool = True, show_progress: bool = True) -> dict:
    summary = train(cfg, resume=resume, show_progress=show_progress)
    result = {"run_dir": cfg.out_dir, "train": summary}
    if evaluate and _is_main_process():
        run_dir = Path(cfg.out_dir)
        model, tokenizer = load_student(run_dir)
        result["eval"] = {k: v for k, v in evaluate_run(cfg, model, tokenizer, run_dir, run_dir / rundir.STUDENT).items() if k != "samples"}
        if cfg.quant.scheme is not None:  # the quantized student too: eval-<scheme>.json
            folder = run_dir / rundir.quantized_student(cfg.quant.scheme)
            model, tokenizer = load_student(folder)
            quantized = evaluate_run(cfg, model, tokenizer, run_dir, folder)
            result["eval_quantized"] = {k: v for k, v in quantized.items() if k != "samples"}
    return result


def run_eval(path: str, config: str | None = None, gates: bool = False, scheme: str | None = None) -> dict:
    """Evaluate a run directory or a model folder (with --config for its data); gates: the
    config must set release gates (they are checked either way when set). scheme: the run's
    quantized student RUN/student-<scheme>/ instead of RUN/student/ (eval-<scheme>.json). A
    quantized model folder is evaluated as it is."""
    p = Path(path)
    if not p.exists():
        raise DistillError(f"not found: {p}")
    cfg_path = Path(config) if config else p / rundir.CONFIG
    if not cfg_path.exists():
        raise DistillError(f"{p} is not a run directory; pass --config RUN.yaml to say which data to evaluate on")
    cfg = load_config(cfg_path)
    if gates and not cfg.gates.expressions():
        raise ConfigError(f"{cfg_path}: --gates, but the config sets no 'gates' (e.g. gates.accuracy: '>= 0.9 * teacher')")
    run_dir = p if (p / rundir.CONFIG).exists() else None
    folder = p / rundir.STUDENT if run_dir is not None else p
    if scheme is not None:
        if scheme not in SCHEMES:
            raise DistillError(f"--scheme {scheme!r}: known schemes are {', '.join(SCHEMES)}")
        if run_dir is None:
            raise DistillError(f"--scheme picks a run's quantized student; {p} is not a run directory (evaluate the quantized folder itself)")
        folder = p / rundir.quantized_student(scheme)
        if not (folder / rundir.QUANT).is_file():
            raise DistillError(f"{p} has no quantized student {folder.name}/: run distill quantize {p} --scheme {scheme}")
    model, tokenizer = load_student(folder)
    return evaluate_run(cfg, model, tokenizer, run_dir, folder)
