"""Offline teacher-logit cache: run the teacher once, train many students from its top-k.

    distill cache run.yaml --out cache/ --top-k 32        # writes the cache (resumable)
    distill train run.yaml teacher_cache=cache/           # trains with no teacher in memory

For every next-token target of every training example (the positions the loss sees) the
cache keeps the teacher's top-k token ids, their log-probabilities at the loss temperature
and the log of the leftover mass (everything outside the top-k, one bucket), which the
sparse divergences of `distill.loss.divergences` consume.

On disk:

    cache/
      manifest.json            teacher id, tokenizer hash, dataset hash, k, dtype,
                               temperature, vocab size, shard size, and one entry per
                               finished shard: file, examples, tokens, bytes, sha256;
                               a cross-tokenizer cache: cross_tokenizer, teacher_tokenizer_hash
      shard-00000.safetensors  offsets (count + 1,) int64   token range of each example
                               ids (tokens, k) int32         top-k ids, best first
                               logprobs (tokens, k) float16|float32
                               rest (tokens,) float32        log leftover mass (-inf: none)
                               cross-tokenizer caches also (teacher ids, all positions):
                               teacher_offsets (count + 1,)  token range of each example
                               teacher_tokens (n,) int32     the teacher's tokenization

Shards are written to a temp file, flushed to disk and renamed, and a shard counts only
once the manifest (itself replaced atomically) lists it, so a killed run leaves nothing
half-written: rerun the same command and it verifies the listed shards and writes the rest.
A listed shard whose size or sha256 does not match the manifest is named on stderr and
rewritten by `distill cache`, and named in the error that stops a run reading the cache
(never used). A manifest that is not what `distill cache` writes (not an object, no shard
list, a shard file outside the cache folder, fewer shards than the examples need) is
refused in one line naming the field.
"""

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from distill.data.rows import Example
from distill.errors import DistillError
from distill.loss.token_losses import IGNORE_INDEX
from distill.paths import read_json

FORMAT = 1
LOGPROB_DTYPES = {"float16": torch.float16, "float32": torch.float32}
# Keys whose mismatch means a cache belongs to another run; checked in this order.
IDENTITY_KEYS = ("tokenizer_hash", "dataset_hash", "temperature", "teacher", "teacher_tokenizer_hash")


def tokenizer_hash(tokenizer) -> str:
    """sha256 (16 hex) of the token -> id map and the special ids: equal hashes, same ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = [tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id]
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()[:16]


def dataset_hash(examples: list[Example]) -> str:
    """sha256 (16 hex) of every example's token ids and labels (and positions, for packed
    blocks), in order."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.input_ids, e.labels] + ([e.position_ids] if e.position_ids is not None else [])).encode())
    return h.hexdigest()[:16]


def target_counts(examples: list[Example]) -> list[int]:
    """Next-token targets per example: labels[1:] that are not IGNORE_INDEX."""
    return [sum(1 for y in e.labels[1:] if y != IGNORE_INDEX) for e in examples]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


SHARD_FILE = re.compile(r"^shard-\d{5,}\.safetensors$")  # a plain name: never a path out of the folder
_HEADER_INTS = ("top_k", "vocab_size", "shard_examples", "n_examples")
_SHARD_INTS = ("index", "first_example", "examples", "tokens", "bytes")


def _is_int(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_manifest(m, where: Path) -> None:
    """Refuse a manifest `distill cache` did not write: one DistillError naming the field."""

    def bad(what: str) -> DistillError:
        return DistillError(f"{where}: {what}; not a manifest `distill cache` writes (rewrite the cache)")

    if not isinstance(m, dict):
        raise bad(f"a JSON {type(m).__name__}, not an object")
    for key in _HEADER_INTS:
        if not _is_int(m.get(key), 0 if key == "n_examples" else 1):
            raise bad(f"{key} is {m.get(key)!r}, not a positive integer")
    temperature = m.get("temperature")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise bad(f"temperature is {temperature!r}, not a positive number")
    if m.get("logprob_dtype") not in LOGPROB_DTYPES:
        raise bad(f"logprob_dtype is {m.get('logprob_dtype')!r}, not one of {sorted(LOGPROB_DTYPES)}")
    shards = m.get("shards")
    if not isinstance(shards, list):
        raise bad("no 'shards' list")
    n_shards = -(-m["n_examples"] // m["shard_examples"])
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict):
            raise bad(f"shards[{i}] is not an object")
        file = shard.get("file")
        if not isinstance(file, str) or not SHARD_FILE.match(file):
            raise bad(f"shards[{i}].file is {file!r}, not a shard file name inside the cache folder")
        for key in _SHARD_INTS:
            if not _is_int(shard.get(key), 0):
                raise bad(f"shards[{i}].{key} is {shard.get(key)!r}, not a non-negative integer")
        if shard["index"] >= n_shards or not isinstance(shard.get("sha256"), str):
            raise bad(f"shards[{i}] has index {shard['index']} of {n_shards} shards, or no sha256")
        first = shard["index"] * m["shard_examples"]
        if shard["first_example"] != first or shard["examples"] != min(m["shard_examples"], m["n_examples"] - first):
            raise bad(f"shards[{i}] holds examples {shard['first_example']}+{shard['examples']}, not its shard's")
    if m.get("complete") and sorted(s["index"] for s in shards) != list(range(n_shards)):
        raise bad(f"marked complete with {len(shards)} of the {n_shards} shards its {m['n_examples']} examples need")


def read_manifest(path: Path) -> dict:
    manifest_path = Path(path) / "manifest.json"
    if not manifest_path.exists():
        raise DistillError(f"{path}: not a teacher cache (no manifest.json); write one with `distill cache`")
    manifest = read_json(manifest_path, "teacher cache manifest")
    if isinstance(manifest, dict) and manifest.get("format") != FORMAT:
        raise DistillError(f"{manifest_path}: cache format {manifest.get('format')!r}, this distill reads {FORMAT}")
    check_manifest(manifest, manifest_path)
    return manifest


class TeacherCache:
    """A finished cache, verified shard by shard, serving one example's top-k at a time."""

    def __init__(self, path: str | Path, expected: dict):
        """Open and verify the cache at `path` against the run's identity.

        Args:
            expected: tokenizer_hash, dataset_hash, temperature and teacher (None: any) of
                the run; a mismatch is refused with a message naming the key.
        """
        self.path = Path(path)
        self.manifest = m = read_manifest(self.path)
        self.cross = bool(m.get("cross_tokenizer", False))
        if self.cross != bool(expected.get("cross_tokenizer", False)):
            kind = "a cross-tokenizer cache (teacher tokens)" if self.cross else "a cache in the student's tokens"
            raise DistillError(f"{self.path}: {kind}, but this run's objective.cross_tokenizer says otherwise; "
                               f"rebuild it with `distill cache` for this run")  # fmt: skip
        for key in IDENTITY_KEYS:
            want = expected.get(key)
            if want is not None and m.get(key) != want:
                raise DistillError(
                    f"{self.path}: the cache's {key} is {m.get(key)!r} but this run's is {want!r}; "
                    f"rebuild it with `distill cache` for this run"
                )
        if not m.get("complete"):
            raise DistillError(
                f"{self.path}: incomplete cache ({len(m['shards'])} shards written); rerun `distill cache` to finish it"
            )
        self.k, self.vocab_size, self.temperature = m["top_k"], m["vocab_size"], m["temperature"]
        self.size = m["shard_examples"]
        self.shards = [self._load(s) for s in sorted(m["shards"], key=lambda s: s["index"])]

    def _load(self, shard: dict) -> dict[str, torch.Tensor]:
        path = self.path / shard["file"]
        if not path.exists():
            raise DistillError(f"{path}: shard missing; rerun `distill cache` to rewrite it")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise DistillError(f"{path}: truncated or altered ({size} bytes, manifest says {shard['bytes']}); rerun `distill cache`")
        if file_sha256(path) != shard["sha256"]:
            raise DistillError(f"{path}: checksum mismatch (corrupted); rerun `distill cache` to rewrite it")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise DistillError(f"{path}: unreadable shard ({e})") from None
        n, k = shard["tokens"], self.k
        want = {"offsets": (shard["examples"] + 1,), "ids": (n, k), "logprobs": (n, k), "rest": (n,)}
        if self.cross:
            want["teacher_offsets"] = (shard["examples"] + 1,)
        for key, shape in want.items():
            if key not in tensors or tuple(tensors[key].shape) != shape:
                got = tuple(tensors[key].shape) if key in tensors else "missing"
                raise DistillError(f"{path}: tensor {key!r} is {got}, the manifest says {shape}; rerun `distill cache`")
        offsets, ids = tensors["offsets"], tensors["ids"]
        if offsets[0].item() != 0 or offsets[-1].item() != n or bool((offsets[1:] < offsets[:-1]).any()):
            raise DistillError(f"{path}: its offsets do not cover its {n} tokens in order; rerun `distill cache`")
        if ids.numel() and (ids.min().item() < 0 or ids.max().item() >= self.vocab_size):
            raise DistillError(f"{path}: token ids outside the vocabulary of {self.vocab_size}; rerun `distill cache`")
        if self.cross:  # the teacher's tokens of each example: one more than its top-k rows
            t_off, tokens = tensors["teacher_offsets"], tensors.get("teacher_tokens")
            lengths = t_off[1:] - t_off[:-1]
            if tokens is None or tokens.shape != (t_off[-1].item(),) or not torch.equal(lengths - 1, offsets[1:] - offsets[:-1]):
                raise DistillError(f"{path}: its teacher tokens do not match its top-k rows; rerun `distill cache`")
        return tensors

    def example(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Example i's ids (n, k) int64, logprobs (n, k) float32, rest (n,) float32."""
        shard = self.shards[i // self.size]
        j = i % self.size
        a, b = shard["offsets"][j].item(), shard["offsets"][j + 1].item()
        return shard["ids"][a:b].long(), shard["logprobs"][a:b].float(), shard["rest"][a:b]

    def cross_example(self, i: int) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
        """A cross-tokenizer cache's example i: the teacher's tokens, and the top-k at each
        of its positions but the last (ids, logprobs, rest as in `example`)."""
        shard = self.shards[i // self.size]
        j = i % self.size
        a, b = shard["teacher_offsets"][j].item(), shard["teacher_offsets"][j + 1].item()
        return (shard["teacher_tokens"][a:b].tolist(), *self.example(i))

    def attach(self, batch: dict[str, torch.Tensor], indices: list[int]) -> dict[str, torch.Tensor]:
        """Add teacher_ids (B, T-1, k), teacher_logprobs (B, T-1, k), teacher_rest (B, T-1)
        at the batch's next-token targets (zeros / -inf elsewhere, masked by the loss)."""
        valid = batch["labels"][:, 1:] != IGNORE_INDEX  # (B, T-1)
        b, t = valid.shape
        ids = torch.zeros(b, t, self.k, dtype=torch.long)
        logprobs = torch.zeros(b, t, self.k)
        rest = torch.full((b, t), -torch.inf)
        for row, i in enumerate(indices):
            e_ids, e_lp, e_rest = self.example(i)
            where = valid[row].nonzero().squeeze(1)  # (n,)
            if where.numel() != e_ids.shape[0]:
                raise DistillError(
                    f"{self.path}: example {i} has {where.numel()} targets but the cache holds {e_ids.shape[0]}"
                )
            ids[row, where], logprobs[row, where], rest[row, where] = e_ids, e_lp, e_rest
        return {**batch, "teacher_ids": ids, "teacher_logprobs": logprobs, "teacher_rest": rest}
