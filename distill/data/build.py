"""Builders: the data config -> rows and tokenized examples, per split and per task."""

from distill.config import DataConfig, RunConfig
from distill.data.rationale import task_rows
from distill.data.rows import Example, Row, load_rows, tokenize_rows


def build_rows(dcfg: DataConfig, split: str) -> list[Row]:
    if split == "train":
        return load_rows(dcfg.source, "train", dcfg.n_train, dcfg.seed, dcfg.min_ops, dcfg.max_ops)
    if dcfg.source.startswith("builtin:"):
        return load_rows(dcfg.source, split, dcfg.n_test, dcfg.seed, dcfg.min_ops, dcfg.max_ops)
    if dcfg.eval_source is None:
        return []
    return load_rows(dcfg.eval_source, split, dcfg.n_test, dcfg.seed, dcfg.min_ops, dcfg.max_ops)[: dcfg.n_test]


def build_examples(dcfg: DataConfig, tokenizer) -> list[Example]:
    rows = build_rows(dcfg, "train")
    return tokenize_rows(rows, tokenizer, dcfg.max_length, source=dcfg.source)


def build_task_examples(cfg: RunConfig, tokenizer) -> list[list[Example]]:
    """Training examples per task (`distill.data.rationale`): one list, or the label and the
    rationale task's lists of step-by-step multitask training, aligned by row."""
    rows = build_rows(cfg.data, "train")
    tasks = task_rows(rows, cfg.rationale, cfg.data.source)
    return [tokenize_rows(r, tokenizer, cfg.data.max_length, source=cfg.data.source) for r in tasks]
