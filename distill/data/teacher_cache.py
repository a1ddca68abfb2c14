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
                               finished shard: file, examples, tokens, bytes, sha256
      shard-00000.safetensors  offsets (count + 1,) int64   token range of each example
                               ids (tokens, k) int32         top-k ids, best first
                               logprobs (tokens, k) float16|float32
                               rest (tokens,) float32        log leftover mass (-inf: none)

Shards are written to a temp file and renamed, and a shard counts only once the manifest
(itself replaced atomically) lists it, so a killed run leaves nothing half-written: rerun
the same command and it verifies the listed shards and writes the rest. A shard whose
size or sha256 does not match the manifest is named in the error and never used.
"""

import hashlib
import json
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
IDENTITY_KEYS = ("tokenizer_hash", "dataset_hash", "temperature", "teacher")


def tokenizer_hash(tokenizer) -> str:
    """sha256 (16 hex) of the token -> id map and the special ids: equal hashes, same ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = [tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id]
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()[:16]


def dataset_hash(examples: list[Example]) -> str:
    """sha256 (16 hex) of every example's token ids and labels, in order."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.input_ids, e.labels]).encode())
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


def read_manifest(path: Path) -> dict:
    manifest_path = Path(path) / "manifest.json"
    if not manifest_path.exists():
        raise DistillError(f"{path}: not a teacher cache (no manifest.json); write one with `distill cache`")
    manifest = read_json(manifest_path, "teacher cache manifest")
    if manifest.get("format") != FORMAT:
        raise DistillError(f"{manifest_path}: cache format {manifest.get('format')!r}, this distill reads {FORMAT}")
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
        self.shards = [self._load(s) for s in m["shards"]]

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
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise DistillError(f"{path}: unreadable shard ({e})") from None

    def example(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Example i's ids (n, k) int64, logprobs (n, k) float32, rest (n,) float32."""
        shard = self.shards[i // self.size]
        j = i % self.size
        a, b = shard["offsets"][j].item(), shard["offsets"][j + 1].item()
        return shard["ids"][a:b].long(), shard["logprobs"][a:b].float(), shard["rest"][a:b]

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
