"""Packing: whole tokenized rows (documents) into blocks of at most data.max_length tokens,
attention kept inside each document.

A block is one `Example` whose documents sit back to back, each ending in its EOS:

    input_ids     a0 a1 a2 EOS b0 b1 EOS c0 c1 c2 c3 EOS
    position_ids  0  1  2  3   0  1  2   0  1  2  3  4      restart at each document
    labels        -  a1 a2 EOS -  b1 EOS -  c1 c2 c3 EOS    - = IGNORE_INDEX

Position t predicts label t + 1, so the ignored label at a document's first token means
nothing is ever predicted from the previous document: the targets of a block are exactly
the targets of its documents alone, each counted once (a document alone never predicts its
first token either, there being nothing before it).

The model sees the block with `model_inputs`: position_ids and no attention_mask, no KV
cache. transformers 5 then builds the causal mask per document from the position ids
(`masking_utils.find_packed_sequence_indices`: a new document wherever a position does not
follow the one before), and sliding-window layers (Gemma 3) keep their window inside the
document. Measured on tiny llama, qwen2 and gemma3 models with sdpa and eager attention
(tests/data/test_packing.py): every document's logits equal those of the document alone
(1e-5). What does not work, measured the same way: position_ids with a KV cache
(transformers skips the packed check whenever a cache exists, and a forward without
use_cache=False makes one: documents see each other), a 4D boolean mask under eager
attention (added to the scores as 0/1, not applied), and any 4D mask on Gemma 3 (one mask
for both kinds of layer: the sliding window is lost). With sdpa the block-diagonal mask is
materialised, (B, 1, T, T) booleans per forward.
`check_isolation` verifies the behaviour on the run's own models (any attention
implementation) before training starts.

By default rows are never split across blocks: a row longer than max_length is an error,
or cut by data.truncate, and blocks are filled best-fit, longest rows first (deterministic),
leaving what no row fits as padding. With data.split_rows (`split_examples`) the rows are
laid end to end in their order and cut every max_length tokens: a row cut at a block's end
continues at the next block's start as a document of its own (positions from 0, attention
only inside the piece), so every block but the last is full and the only target lost is
the first token of each continuation.
"""

import bisect

import torch

from distill.data.rows import Example
from distill.errors import DistillError
from distill.loss.token_losses import IGNORE_INDEX


def pack_examples(examples: list[Example], max_length: int) -> list[Example]:
    """Pack whole examples into blocks of at most `max_length` tokens (best-fit decreasing).

    Returns the blocks in the order they were opened; within a block, documents keep their
    order in `examples`. Each example lands in exactly one block.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    free: list[tuple[int, int]] = []  # (room left, block index), sorted: the tightest fit first
    blocks: list[list[int]] = []
    for i in order:
        n = len(examples[i].input_ids)
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, over the block length {max_length}")
        j = bisect.bisect_left(free, (n, -1))
        if j == len(free):
            blocks.append([i])
            room, b = max_length - n, len(blocks) - 1
        else:
            room, b = free.pop(j)
            blocks[b].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, b))
    return [block_of([examples[i] for i in sorted(members)]) for members in blocks]


def split_examples(examples: list[Example], max_length: int) -> list[Example]:
    """The examples end to end, in order, cut into blocks of exactly `max_length` tokens (the
    last block may be shorter). A piece of an example is a document of its own in its block."""
    blocks: list[Example] = []
    pieces: list[Example] = []
    room = max_length
    for e in examples:
        start, n = 0, len(e.input_ids)
        while start < n:
            take = min(room, n - start)
            pieces.append(Example(e.input_ids[start : start + take], e.labels[start : start + take]))
            start, room = start + take, room - take
            if room == 0:
                blocks.append(block_of(pieces))
                pieces, room = [], max_length
    if pieces:
        blocks.append(block_of(pieces))
    return blocks


def block_of(documents: list[Example]) -> Example:
    """One block from whole documents: ids and labels concatenated, each document's first
    label ignored, positions restarting at 0 per document."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for d in documents:
        ids += d.input_ids
        labels += [IGNORE_INDEX] + d.labels[1:]  # nothing before a document's first token predicts it
        positions += range(len(d.input_ids))
    return Example(ids, labels, positions)


def document_starts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T) True at the first token of every document: position 0 of each sequence,
    and of each packed document."""
    starts = torch.zeros_like(batch["input_ids"], dtype=torch.bool)  # (B, T)
    starts[:, 0] = True
    if "position_ids" in batch:
        starts |= batch["position_ids"] == 0
    return starts


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """The forward's keyword arguments for a collated batch.

    Packed blocks: input_ids and position_ids only, with use_cache=False; transformers then
    keeps attention inside each document (see the module doc). Whole rows: input_ids and
    the padding attention_mask.
    """
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def leaks_across_documents(model, first: list[int], other: list[int], second: list[int]) -> float:
    """How much the logits of document `second` move when the document packed before it
    changes from `first` to `other` (same length): 0 when attention stays inside documents.

    Returns the largest absolute change relative to the largest logit (both blocks have the
    same shape, so a model that keeps documents apart gives 0 up to rounding).
    """
    if len(first) != len(other):
        raise ValueError("the two documents swapped in front must have the same length")
    device = next(model.parameters()).device
    blocks = [block_of([Example(d, d), Example(second, second)]) for d in (first, other)]
    ids = torch.tensor([b.input_ids for b in blocks], device=device)  # (2, T)
    positions = torch.tensor([b.position_ids for b in blocks], device=device)  # (2, T)
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits.float()  # (2, T, V)
    finally:
        model.train(was_training)
    tail = logits[:, len(first) :]  # (2, len(second), V) the second document's logits
    return ((tail[0] - tail[1]).abs().max() / logits.abs().max().clamp(min=1.0)).item()


def check_isolation(models: dict, examples: list[Example], tokens: int = 16) -> None:
    """Refuse to train packed blocks with a model whose attention crosses documents.

    Two documents are cut from the data (at most `tokens` tokens each) and the first is
    swapped for another of its length; a model (role -> module) whose second document's
    logits move (its attention ignores packed position ids) is a DistillError naming
    data.packing.
    """
    docs = [d[:tokens] for block in examples[:64] for d in _documents(block) if len(d) >= 2]
    if len(docs) < 2:
        return  # fewer than two documents: nothing can leak
    first, second = docs[0], docs[1]
    swaps = [first[::-1], first[1:] + first[:1]] + [[t] * len(first) for t in sorted(set(second))]
    other = next((c for c in swaps if c != first), None)
    if other is None:
        return
    for role, model in models.items():
        moved = leaks_across_documents(model, first, other, second)
        if moved > 1e-3:
            raise DistillError(
                f"data.packing: the {role}'s attention crosses document boundaries in a packed block (logits move by "
                f"{moved:.2g} of their scale): its attention implementation ignores packed position ids. Set "
                f"data.packing=false, or load the model with attn_implementation eager or sdpa (transformers 5)"
            )


def _documents(block: Example) -> list[list[int]]:
    """The token ids of each document of a packed block (the block itself when unpacked)."""
    if block.position_ids is None:
        return [block.input_ids]
    docs: list[list[int]] = []
    for tok, pos in zip(block.input_ids, block.position_ids):
        if pos == 0:
            docs.append([])
        docs[-1].append(tok)
    return docs
