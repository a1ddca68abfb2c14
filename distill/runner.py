"""Run-level steps shared by the CLI and the demo: train then evaluate, evaluate a run."""

import os
from pathlib import Path

from distill.build import build_rows
from distill.config import RunConfig, load_config
from distill.errors import DistillError
from distill.evaluate import evaluate_rows, load_student
from distill.paths import atomic_write_json
from distill.rationale import eval_rows
from distill.train import train


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def evaluate_run(cfg: RunConfig, model, tokenizer, run_dir: Path | None) -> dict:
    rows = eval_rows(build_rows(cfg.data, "test"), cfg.rationale)
    if not rows:
        return {"n": 0}
    fmt = "chain" if cfg.data.source == "builtin:chain" else cfg.eval.answer_format
    direct = cfg.rationale.mode != "completion"
    e = cfg.eval
    result = evaluate_rows(model, tokenizer, rows, e.max_new_tokens, e.batch_size, cfg.data.max_length, fmt, direct)
    if run_dir is not None:
        atomic_write_json(run_dir / "eval.json", result)
    return result


def run_training(cfg: RunConfig, resume: bool = False, evaluate: bool = True, show_progress: bool = True) -> dict:
    summary = train(cfg, resume=resume, show_progress=show_progress)
    result = {"run_dir": cfg.out_dir, "train": summary}
    if evaluate and _is_main_process():
        model, tokenizer = load_student(cfg.out_dir)
        result["eval"] = {k: v for k, v in evaluate_run(cfg, model, tokenizer, Path(cfg.out_dir)).items() if k != "samples"}
    return result


def run_eval(path: str, config: str | None = None) -> dict:
    p = Path(path)
    if not p.exists():
        raise DistillError(f"not found: {p}")
    cfg_path = Path(config) if config else p / "config.yaml"
    if not cfg_path.exists():
        raise DistillError(f"{p} is not a run directory; pass --config RUN.yaml to say which data to evaluate on")
    cfg = load_config(cfg_path)
    model, tokenizer = load_student(p)
    run_dir = p if (p / "config.yaml").exists() else None
    return evaluate_run(cfg, model, tokenizer, run_dir)
