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
import os
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from distill.budget import forward_flops, record_phase
from distill.data.rows import Example, collate
from distill.errors import DistillError
from distill.loss.token_losses import IGNORE_INDEX
from distill.paths import atomic_write_json, read_json

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


@torch.no_grad()
def teacher_topk(
    teacher, examples: list[Example], pad_id: int, vocab: int, k: int, temperature: float, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of log_softmax(teacher logits / T) at every next-token target of `examples`.

    Examples are batched by length (less padding), results returned in example order:
    ids (n, k) int64, logprobs (n, k) float32 and rest (n,) float32 = log of the mass
    outside the top-k (an exact logsumexp; -inf when none is left).
    """
    device = next(teacher.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    per_example: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = [None] * len(examples)  # type: ignore[list-item]
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        batch = collate([examples[i] for i in chosen], pad_id)
        logits = teacher(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits[:, :-1, :vocab]  # (B, T-1, V)
        valid = (batch["labels"][:, 1:] != IGNORE_INDEX).to(device)  # (B, T-1)
        log_p = torch.log_softmax(logits[valid].float() / temperature, dim=-1)  # (n, V) rows in batch order
        top = log_p.topk(k, dim=-1)  # (n, k) best first
        if k < vocab:
            rest = log_p.scatter_(-1, top.indices, -torch.inf).logsumexp(-1)  # (n,)
        else:
            rest = torch.full((log_p.shape[0],), -torch.inf, device=device)
        counts = valid.sum(1).tolist()  # targets per row
        parts = zip(top.indices.cpu().split(counts), top.values.cpu().split(counts), rest.cpu().split(counts))
        for i, part in zip(chosen, parts):
            per_example[i] = part
    return tuple(torch.cat([p[j] for p in per_example]) for j in range(3))  # type: ignore[return-value]


class CacheWriter:
    """Writes (or completes) a cache directory for one teacher, tokenizer, dataset and k."""

    def __init__(self, out: Path, header: dict, n_examples: int):
        self.out = Path(out)
        self.header = {"format": FORMAT, **header, "n_examples": n_examples}
        self.n_shards = -(-n_examples // header["shard_examples"])
        manifest_path = self.out / "manifest.json"
        if manifest_path.exists():
            manifest = read_manifest(self.out)
            for key, want in self.header.items():
                if manifest.get(key) != want:
                    raise DistillError(
                        f"{manifest_path}: a cache with {key}={manifest.get(key)!r} already lives here, this run "
                        f"has {want!r}; write to another --out"
                    )
            self.shards = {s["index"]: s for s in manifest["shards"] if self._intact(s)}
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            self.shards = {}
        for stale in self.out.glob(".*.tmp"):  # left by a killed run: never listed, never read
            stale.unlink()
        self._save_manifest()

    def _intact(self, shard: dict) -> bool:
        path = self.out / shard["file"]
        return path.exists() and path.stat().st_size == shard["bytes"] and file_sha256(path) == shard["sha256"]

    def _save_manifest(self) -> None:
        shards = [self.shards[i] for i in sorted(self.shards)]
        complete = len(shards) == self.n_shards
        atomic_write_json(self.out / "manifest.json", {**self.header, "complete": complete, "shards": shards})

    def todo(self) -> list[int]:
        return [i for i in range(self.n_shards) if i not in self.shards]

    def write_shard(self, index: int, counts: list[int], ids, logprobs, rest) -> None:
        size = self.header["shard_examples"]
        offsets = torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)  # (count + 1,)
        if offsets[-1].item() != ids.shape[0]:
            raise DistillError(f"shard {index}: {ids.shape[0]} teacher tokens for {offsets[-1].item()} targets")
        tensors = {
            "offsets": offsets,
            "ids": ids.to(torch.int32).contiguous(),
            "logprobs": logprobs.to(LOGPROB_DTYPES[self.header["logprob_dtype"]]).contiguous(),
            "rest": rest.to(torch.float32).contiguous(),
        }
        data = save(tensors)  # the shard's bytes: hashed here, written once, never re-read
        name = f"shard-{index:05d}.safetensors"
        tmp = self.out / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.out / name)
        self.shards[index] = {
            "index": index,
            "file": name,
            "first_example": index * size,
            "examples": len(counts),
            "tokens": int(ids.shape[0]),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        self._save_manifest()


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


def write_teacher_cache(
    cfg, out: str | Path, top_k: int, logprob_dtype: str, shard_examples: int, batch_size: int, show_progress: bool = True
) -> dict:
    """Run cfg.teacher over cfg.data's training examples once; write (or finish) the cache.

    Returns the manifest. The temperature is cfg.objective.temperature: the cached
    log-probabilities are at the loss temperature, so a run must use the same one. The
    teacher's pass is recorded as phase teacher_caching of OUT/budget.json (tokens read,
    2 x params x tokens FLOPs, seconds; a resumed cache adds to it).
    """
    from distill.models.build import build_examples, build_model, build_tokenizer, model_id
    from distill.models.loading import count_parameters
    from distill.progress import Progress

    if cfg.teacher is None:
        raise DistillError("distill cache needs a 'teacher' section in the run config")
    if logprob_dtype not in LOGPROB_DTYPES:
        raise DistillError(f"--dtype must be one of {sorted(LOGPROB_DTYPES)}, got {logprob_dtype!r}")
    if shard_examples < 1 or batch_size < 1:
        raise DistillError("--shard-examples and --batch-size must be >= 1")
    tokenizer = build_tokenizer(cfg.teacher, "teacher")
    vocab = len(tokenizer)
    if not 1 <= top_k <= vocab:
        raise DistillError(f"--top-k must be in [1, {vocab}] (the teacher's vocabulary), got {top_k}")
    examples = build_examples(cfg.data, tokenizer)
    header = {
        "teacher": model_id(cfg.teacher, cfg.train.seed + 1),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "dataset_hash": dataset_hash(examples),
        "temperature": cfg.objective.temperature,
        "top_k": top_k,
        "logprob_dtype": logprob_dtype,
        "vocab_size": vocab,
        "shard_examples": shard_examples,
    }
    writer = CacheWriter(Path(out), header, len(examples))
    todo = writer.todo()
    if todo:
        teacher = build_model(cfg.teacher, tokenizer, "teacher", cfg.train.seed + 1)
        device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device == "auto" else "cpu")
        teacher.to(device).eval()
        params = count_parameters(teacher)
        counts = target_counts(examples)
        done = writer.n_shards - len(todo)
        progress = Progress(writer.n_shards, done, enabled=show_progress, label="cache")
        for index in todo:
            t0 = time.perf_counter()
            lo, hi = index * shard_examples, min((index + 1) * shard_examples, len(examples))
            ids, logprobs, rest = teacher_topk(
                teacher, examples[lo:hi], tokenizer.pad_token_id, vocab, top_k, cfg.objective.temperature, batch_size
            )
            writer.write_shard(index, counts[lo:hi], ids, logprobs, rest)
            # Recorded shard by shard: a killed and resumed cache counts every shard once.
            read = sum(len(e.input_ids) for e in examples[lo:hi])
            add = {"tokens": read, "flops": forward_flops(params, read), "seconds": time.perf_counter() - t0}
            record_phase(Path(out) / "budget.json", "teacher_caching", add=add)
            done += 1
            progress.update(done, float("nan"), 0.0)
        progress.close()
    return read_manifest(Path(out))
