"""Every random stream of a run and of teacher generation, named in one place, each a pure
function of the seed.

Streams never share a seed, so adding randomness to one part (say, the projectors) does not
shift another (the data order or a rollout); and a resumed run redraws exactly what the
uninterrupted one drew.
"""

import hashlib

_MIX = 1_000_003  # a prime that spreads (seed, counter) pairs apart


def student_init(seed: int) -> int:
    """Initial weights of an inline (random) student."""
    return seed


def teacher_init(seed: int) -> int:
    """Initial weights of an inline teacher; also part of its identity in a teacher cache."""
    return seed + 1


def projector_init(seed: int) -> int:
    """The feature projectors' initial weights."""
    return seed + 2


def epoch_order(seed: int, epoch: int) -> int:
    """The shuffle of the training examples in one epoch."""
    return seed * _MIX + epoch


def on_policy_draw(seed: int, step: int) -> int:
    """Whether an optimizer step trains on student samples (the same draw on every process)."""
    return seed * _MIX + step + 7_777


def rollout_row(seed: int, step: int, index: int) -> int:
    """The sampling noise of one example's rollout at one step."""
    return ((seed * _MIX + step) * 1_000_033 + index) % (2**63)


def eval_sample(seed: int, index: int) -> int:
    """The sampling noise of one held-out prompt in sampled evaluation."""
    return seed * _MIX + index


def generation_row(seed: int, prompt_hash: str, sample: int) -> int:
    """The sampling seed of one (prompt, sample) row of `distill generate`: a pure function of
    the prompt, so a resumed or re-batched generation draws the same rows."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_hash}:{sample}".encode()).digest()[:7], "big")
