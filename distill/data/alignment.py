"""Aligning two tokenizations of the same bytes.

Each token covers a byte span of the text; special tokens (BOS, EOS, chat markers) cover
none. A byte offset where a token starts on BOTH sides is a common boundary; the common
boundaries cut the text into groups, each holding one or more whole tokens of each side
(" hello" = teacher [" hello"] = student [" hel", "lo"]). Every byte lies in exactly one
group on each side.

At a common boundary b both models predict the next token from the same text [0, b), so
their next-token distributions are comparable there: that is a KD pair (the student's
logits at the position before its token at b, the teacher's at the position before its
token at b). A side needs a position before the token to predict it: a BOS on one side
only (Gemma adds one, SmolLM2 does not) leaves the text's first token unpaired, never
misaligned. The two end-of-sequence tokens after the last byte form a pair too.
"""

import bisect
import itertools
from dataclasses import dataclass, field

from distill.errors import DistillError


@dataclass(frozen=True)
class Group:
    start: int  # byte offsets [start, end)
    end: int
    student: tuple[int, ...]  # token indices on each side
    teacher: tuple[int, ...]


@dataclass
class Alignment:
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (student position, teacher position) of the predicting logits
    groups: list[Group] = field(default_factory=list)

    def exact_student_tokens(self) -> int:
        """Student tokens in groups of one token on each side."""
        return sum(1 for g in self.groups if len(g.student) == 1 and len(g.teacher) == 1)


def spans(ids: list[int], table: list[bytes | None], shift: int = 0) -> list[tuple[int, int]]:
    """(start, end) byte span of each token; special tokens are empty spans. `shift` bytes are
    taken off the front (a SentencePiece dummy-prefix space the text does not have)."""
    out, at = [], -shift
    for i in ids:
        n = len(table[i] or b"") if 0 <= i < len(table) else 0
        out.append((max(at, 0), max(at + n, 0)))
        at += n
    return out


def prefix_shift(token_text: bytes, text: bytes, who: str) -> int:
    """0 when a tokenization's bytes are the text's, 1 for a dummy-prefix space; else an error
    naming the first differing byte (a normalizer that rewrites text cannot be aligned)."""
    if token_text == text:
        return 0
    if token_text == b" " + text:
        return 1
    at = next((i for i, (a, b) in enumerate(zip(token_text, text)) if a != b), min(len(token_text), len(text)))
    raise DistillError(
        f"{who} does not reproduce the text byte for byte (they differ at byte {at}: "
        f"{token_text[at:at + 12]!r} vs {text[at:at + 12]!r}); a normalizing tokenizer cannot be aligned"
    )


Segment = tuple[int, int, int]  # (student byte offset, teacher byte offset, length): the same bytes on both sides


def align(
    s_spans: list[tuple[int, int]],
    t_spans: list[tuple[int, int]],
    n_bytes: int,
    s_eos: int | None = None,
    t_eos: int | None = None,
    segments: list[Segment] | None = None,
) -> Alignment:
    """Groups and KD pairs of two tokenizations whose first `n_bytes` bytes are the same text.

    Tokens reaching past `n_bytes` (a sample cut at a UTF-8 boundary) are left out.
    `s_eos` / `t_eos`: the index of each side's end-of-sequence token after the text, if any.
    `segments`: where the two byte strings differ outside some stretches (chat templates
    rendered per tokenizer), the stretches that hold the same bytes; alignment happens inside
    each, offsets counted from its start; groups carry student byte offsets. Default: the
    whole text, [(0, 0, n_bytes)].
    """
    pairs: list[tuple[int, int]] = []
    groups: list[Group] = []
    for s0, t0, length in segments if segments is not None else [(0, 0, n_bytes)]:
        s_in = [(i, a - s0, b - s0) for i, (a, b) in enumerate(s_spans) if b > a >= s0 and b <= s0 + length]
        t_in = [(j, a - t0, b - t0) for j, (a, b) in enumerate(t_spans) if b > a >= t0 and b <= t0 + length]
        s_at = {a: i for i, a, _ in reversed(s_in)}
        t_at = {a: j for j, a, _ in reversed(t_in)}
        common = sorted(set(s_at) & set(t_at))
        pairs += [(s_at[b] - 1, t_at[b] - 1) for b in common if s_at[b] > 0 and t_at[b] > 0]
        cuts = sorted(set(common) | {0, length})
        members: list[tuple[list[int], list[int]]] = [([], []) for _ in cuts[:-1]]
        for side, tokens in enumerate((s_in, t_in)):
            for i, a, _ in tokens:
                members[bisect.bisect_right(cuts, a) - 1][side].append(i)
        groups += [Group(s0 + a, s0 + b, tuple(si), tuple(ti)) for (a, b), (si, ti) in zip(itertools.pairwise(cuts), members)]
    if s_eos is not None and t_eos is not None and s_eos > 0 and t_eos > 0:
        pairs.append((s_eos - 1, t_eos - 1))
    return Alignment(pairs, groups)
