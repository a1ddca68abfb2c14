"""What bytes of text each token id stands for, and the map between two vocabularies.

Cross-tokenizer distillation compares two tokenizations of the same bytes, so it needs
every token's exact bytes, not its decoded string (a byte-fallback token holds one byte of
a multibyte character, which no string can hold):

    byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen)   'Ġw' -> b' w' through the GPT-2 byte alphabet
    SentencePiece with byte fallback (Gemma, Llama 2) '▁w' -> b' w', '<0xE2>' -> b'\\xe2'

Special tokens (BOS, EOS, chat markers) stand for no text: None. The tokenizer kind is read
from the fast tokenizer's own decoder, never guessed from token strings; a tokenizer of any
other kind is a one-line error.
"""

import json
import re
from functools import lru_cache

import torch

from distill.errors import DistillError

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _gpt2_byte_alphabet() -> dict[str, int]:
    """The printable character GPT-2's byte-level BPE uses for each byte, inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _decoder_kind(tokenizer, name: str) -> str:
    """'byte_level' or 'sentencepiece', from the backend tokenizer's decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DistillError(f"{name}: a slow tokenizer ({type(tokenizer).__name__}); cross-tokenizer alignment needs a fast one")
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = [decoder] + list(decoder.get("decoders", []))
    types = {d.get("type") for d in kinds}
    if "ByteLevel" in types:
        return "byte_level"
    if "ByteFallback" in types or "Metaspace" in types:
        return "sentencepiece"
    raise DistillError(f"{name}: decoder {sorted(t for t in types if t)} is neither byte-level BPE nor SentencePiece; "
                       f"its tokens cannot be mapped to bytes")


def _piece_bytes(piece: str, kind: str, alphabet: dict[str, int]) -> bytes:
    if kind == "byte_level":
        if all(c in alphabet for c in piece):
            return bytes(alphabet[c] for c in piece)
        return piece.encode()  # an added token written as plain text
    byte = _BYTE_TOKEN.match(piece)
    if byte:
        return bytes([int(byte.group(1), 16)])
    return piece.replace("\u2581", " ").encode()


def token_bytes(tokenizer, name: str = "tokenizer") -> list[bytes | None]:
    """Bytes of every id below len(tokenizer); None for special tokens (no text)."""
    cached = getattr(tokenizer, "_distill_token_bytes", None)
    if cached is not None:
        return cached
    kind, alphabet = _decoder_kind(tokenizer, name), _gpt2_byte_alphabet()
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    out: list[bytes | None] = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            out.append(None)
        elif i in added:
            out.append(added[i].encode())  # an added non-special token is its text as written
        else:
            out.append(_piece_bytes(piece, kind, alphabet))
    tokenizer._distill_token_bytes = out
    return out


def utf8_prefix(data: bytes) -> bytes:
    """The longest prefix of `data` that is valid UTF-8 (a sample may end mid-character)."""
    try:
        data.decode("utf-8")
        return data
    except UnicodeDecodeError as e:
        return data[: e.start]


def text_of(ids: list[int], table: list[bytes | None]) -> bytes:
    """The bytes of a token sequence (special tokens add none)."""
    return b"".join(table[i] or b"" for i in ids if 0 <= i < len(table))


class VocabMap:
    """Teacher id -> student id for the tokens whose bytes exist in both vocabularies, the
    special tokens both have (by their text, "<|im_end|>"), and the two end-of-sequence
    tokens (no bytes, but the same meaning).

    `pairs` holds every (teacher id, student id) with equal bytes; a student id can be the
    image of several teacher ids (SentencePiece's '▁' and '<0x20>' are both b' '), so
    consumers add those teachers' probabilities. `student_shared` (Vs,) marks the student ids
    that have a teacher counterpart; the rest of each vocabulary is the leftover bucket.
    """

    def __init__(self, teacher_tokenizer, student_tokenizer):
        t_table, s_table = token_bytes(teacher_tokenizer, "teacher tokenizer"), token_bytes(student_tokenizer, "student tokenizer")
        by_bytes = {}
        for i, b in enumerate(s_table):
            if b is not None and b not in by_bytes:  # the first id of a string is its canonical one
                by_bytes[b] = i
        pairs = [(t, by_bytes[b]) for t, b in enumerate(t_table) if b is not None and b in by_bytes]
        # Special tokens stand for no text: the same marker on both sides ("<|im_end|>") is
        # one token, and the two end-of-sequence tokens end a text the same way.
        s_special = {t.content: i for i, t in student_tokenizer.added_tokens_decoder.items() if s_table[i] is None}
        for i, t in teacher_tokenizer.added_tokens_decoder.items():
            if i < len(t_table) and t_table[i] is None and t.content in s_special:
                pairs.append((i, s_special[t.content]))
        eos_t, eos_s = teacher_tokenizer.eos_token_id, student_tokenizer.eos_token_id
        if eos_t is not None and eos_s is not None and eos_t not in {t for t, _ in pairs}:
            pairs.append((eos_t, eos_s))
        pairs = sorted(dict(pairs).items())  # a teacher id maps to one student id
        self.teacher_vocab, self.student_vocab = len(t_table), len(s_table)
        self.teacher_ids = torch.tensor([t for t, _ in pairs], dtype=torch.long)  # (P,)
        self.student_ids = torch.tensor([s for _, s in pairs], dtype=torch.long)  # (P,)
        self.t2s = torch.full((len(t_table),), -1, dtype=torch.long)  # (Vt,)
        self.t2s[self.teacher_ids] = self.student_ids
        self.student_shared = torch.zeros(len(s_table), dtype=torch.bool)  # (Vs,)
        self.student_shared[self.student_ids] = True
        self.t_table, self.s_table = t_table, s_table

    def coverage(self) -> dict[str, float]:
        """Shares of each vocabulary with a counterpart on the other side."""
        return {
            "shared_student_ids": int(self.student_shared.sum()),
            "student_share": float(self.student_shared.float().mean()),
            "teacher_share": float((self.t2s >= 0).float().mean()),
        }
