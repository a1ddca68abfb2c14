"""Builders: the data config -> rows and tokenized examples, per split and per task.

Text rows (every row a {"text"} row) from a JSONL file with no `data.eval_source` are split
by a hash of their text (`rows.text_split`): the held-out share is the "test" split, the
rest the "train" split. Training examples are packed into blocks (`distill.data.packing`)
when `data.packing` says so, or (null) when the rows are text rows.
"""

from distill.config import DataConfig, RunConfig
from distill.data.hf import hf_rows
from distill.data.packing import pack_examples, split_examples
from distill.data.rationale import task_rows
from distill.data.rows import Example, Row, is_text, load_rows, text_split, tokenize_rows
from distill.data.sources import is_hf
from distill.errors import DistillError

UNBOUNDED = 1 << 40  # the row length limit with data.split_rows: rows are cut into blocks, never refused


def read_rows(dcfg: DataConfig, source: str, split: str, n: int) -> list[Row]:
    """The rows of `source`: a JSONL file, an hf: source (data.split for the training rows,
    data.eval_split for the held-out ones; the first n with data.streaming), or a built-in task."""
    if is_hf(source):
        held = split != "train"
        pick, default, key = (dcfg.eval_split, "test", "data.eval_split") if held else (dcfg.split, "train", "data.split")
        return hf_rows(source, pick, dcfg.columns, dcfg.streaming, n, dcfg.subset, default, key)
    return load_rows(source, split, n, dcfg.seed, dcfg.min_ops, dcfg.max_ops)


def build_rows(dcfg: DataConfig, split: str) -> list[Row]:
    """The rows of one split: "train", or a held-out split ("test", at most n_test rows)."""
    if dcfg.source.startswith("builtin:"):
        n = dcfg.n_train if split == "train" else dcfg.n_test
        return load_rows(dcfg.source, split, n, dcfg.seed, dcfg.min_ops, dcfg.max_ops)
    if split != "train" and dcfg.eval_source is not None:
        return read_rows(dcfg, dcfg.eval_source, split, dcfg.n_test)[: dcfg.n_test]
    rows = read_rows(dcfg, dcfg.source, "train", dcfg.n_train)
    if dcfg.eval_source is not None or not is_text(rows):
        return rows if split == "train" else []
    train, heldout = text_split(rows)
    if split == "train" and not train:  # equal texts share a split: all of them can fall in the held-out one
        raise DistillError(
            f"{dcfg.source}: all {len(rows)} text rows fall in the held-out split; add rows or set data.eval_source"
        )
    return train if split == "train" else heldout[: dcfg.n_test]


def packs(dcfg: DataConfig, rows: list[Row]) -> bool:
    """Whether the training rows are packed: data.packing, or when null, text rows."""
    return dcfg.packing if dcfg.packing is not None else is_text(rows)


def tokenize_split(dcfg: DataConfig, rows: list[Row], tokenizer, pack: bool, source: str) -> list[Example]:
    """Tokenized examples of `rows`, packed into blocks of data.max_length when `pack` (rows
    cut across blocks with data.split_rows, which then bounds no row's length)."""
    if dcfg.split_rows:
        if not pack:
            raise DistillError(
                f"data.split_rows=true cuts rows across packed blocks, but {source} is not packed (set data.packing)"
            )
        examples = tokenize_rows(rows, tokenizer, UNBOUNDED, source=source)
        return split_examples(examples, dcfg.max_length)
    examples = tokenize_rows(rows, tokenizer, dcfg.max_length, source=source, truncate=dcfg.truncate)
    return pack_examples(examples, dcfg.max_length) if pack else examples


def build_examples(dcfg: DataConfig, tokenizer) -> list[Example]:
    """The training examples: one per row, or packed blocks."""
    rows = build_rows(dcfg, "train")
    return tokenize_split(dcfg, rows, tokenizer, packs(dcfg, rows), dcfg.source)


def build_task_examples(cfg: RunConfig, tokenizer) -> list[list[Example]]:
    """Training examples per task (`distill.data.rationale`): one list, or the label and the
    rationale task's lists of step-by-step multitask training, aligned by row (multitask is
    never packed: the config refuses data.packing with it)."""
    rows = build_rows(cfg.data, "train")
    tasks = task_rows(rows, cfg.rationale, cfg.data.source)
    pack = packs(cfg.data, rows)
    return [tokenize_split(cfg.data, r, tokenizer, pack, cfg.data.source) for r in tasks]
