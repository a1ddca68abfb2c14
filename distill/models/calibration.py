"""Calibration text for importance pruning: rows of a JSONL file or an hf: source, or built-in prose.

The built-in set is CPython's language reference (`pydoc_data.topics`, shipped with
Python): paragraphs of real English in a fixed order, so a prune with no
`--calibration` file is reproducible on any machine with no download.
"""

from pathlib import Path
from pydoc_data.topics import topics

import torch

from distill.data.hf import hf_rows
from distill.data.rows import read_jsonl
from distill.data.sources import is_hf
from distill.errors import DistillError

CALIBRATION_ROWS = 256
"""Rows measured on when `--calibration-rows` is not given."""
MAX_TOKENS = 256
"""Longest calibration row in tokens; longer rows are truncated (not an error: only statistics)."""
BATCH_ROWS = 8
"""Rows per calibration forward pass."""


def builtin_texts(n: int) -> list[str]:
    """The first n prose paragraphs of CPython's language reference (topics in name order)."""
    texts = []
    for name in sorted(topics):
        for para in topics[name].split("\n\n"):
            para = " ".join(para.split())
            # prose only: no code blocks, tables or grammar rules
            if 200 <= len(para) <= 1500 and not para.startswith(("*", "|", ">>>", "+", "=")):
                texts.append(para)
                if len(texts) == n:
                    return texts
    return texts


def calibration_texts(path: str | Path | None, n: int) -> list[str]:
    """Up to n calibration texts: the first n rows of a JSONL file or of an hf: source's train
    split (streamed: only those rows are read), else the built-in prose.

    A row is {"text"} or {"prompt", "completion"} (prompt and completion are joined: the
    prompt's tokens are part of what the model reads).
    """
    if n < 1:
        raise DistillError(f"--calibration-rows must be at least 1, got {n}")
    if path is None:
        return builtin_texts(n)
    rows = hf_rows(str(path), None, {}, True, n, None) if is_hf(str(path)) else read_jsonl(path)[:n]
    return [row.prompt + row.completion for row in rows]


def calibration_batches(
    texts: list[str], tokenizer, max_tokens: int = MAX_TOKENS, batch_rows: int = BATCH_ROWS
) -> list[dict[str, torch.Tensor]]:
    """Tokenized, right-padded batches of `batch_rows` texts, in the order given.

    Returns:
        Dicts with `input_ids` and `attention_mask`, each (B, T) with T the batch's longest
        row; padding is on the right, so every real token sees exactly its own row.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [tokenizer(t, truncation=True, max_length=max_tokens)["input_ids"] for t in texts]
    rows = [r for r in rows if len(r) >= 2]  # a row needs a next token to score
    if not rows:
        raise DistillError("no calibration row has two or more tokens")
    batches = []
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start : start + batch_rows]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T)
        for i, r in enumerate(chunk):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches
