"""`distill cache`: run the teacher once over the training data and write the cache whose
format `distill.data.teacher_cache` defines (and whose reader lives there too)."""

import hashlib
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save

from distill import rundir, seeds
from distill.budget import forward_flops, record_phase
from distill.data.build import build_examples
from distill.data.packing import model_inputs
from distill.data.rows import Example, collate
from distill.data.teacher_cache import (
    FORMAT,
    LOGPROB_DTYPES,
    dataset_hash,
    file_sha256,
    read_manifest,
    target_counts,
    tokenizer_hash,
)
from distill.errors import DistillError
from distill.loss.fused import auto_chunk_size
from distill.loss.token_losses import IGNORE_INDEX
from distill.models.build import build_model, build_tokenizer, model_id
from distill.models.loading import count_parameters
from distill.paths import atomic_write_bytes, atomic_write_json
from distill.pipeline.chat_client import ServerSettings
from distill.pipeline.served_cache import served_topk
from distill.progress import Progress
from distill.training.cross_teacher import Retokenizer
from distill.training.host_memory import keep_freed_memory


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
        inputs = model_inputs({k: v.to(device) for k, v in batch.items()})  # packed blocks: per-row attention
        logits = teacher(**inputs).logits  # (B, T, V') in the teacher's dtype
        b, t = logits.shape[:2]
        valid = torch.zeros(b, t, dtype=torch.bool, device=device)
        valid[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX  # position t predicts target t + 1
        rows = valid.flatten().nonzero().squeeze(1)  # (n,) flat positions, in batch order
        ids, values, rest = topk_of_rows(logits.reshape(b * t, -1), rows, vocab, k, temperature)
        counts = valid.sum(1).tolist()  # targets per row
        parts = zip(ids.cpu().split(counts), values.cpu().split(counts), rest.cpu().split(counts))
        for i, part in zip(chosen, parts):
            per_example[i] = part
    return tuple(torch.cat([p[j] for p in per_example]) for j in range(3))  # type: ignore[return-value]


def topk_of_rows(
    logits: torch.Tensor, rows: torch.Tensor, vocab: int, k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (n, k), log-probs (n, k) and log of the mass outside them (n,) of
    log_softmax(logits[rows, :vocab] / T), a few rows at a time: each step's fp32 (rows, V)
    buffers stay under CHUNK_LOGITS_CPU values on CPU (reused from the heap, not faulted in
    afresh: `distill.training.host_memory`) instead of one (n, V) copy of the whole batch."""
    step = auto_chunk_size(vocab, logits.device)
    out = []
    for lo in range(0, rows.numel(), step):
        log_p = torch.log_softmax(logits.index_select(0, rows[lo : lo + step])[:, :vocab].float() / temperature, dim=-1)
        top = log_p.topk(k, dim=-1)  # (c, k) best first
        if k < vocab:
            rest = log_p.scatter_(-1, top.indices, -torch.inf).logsumexp(-1)  # (c,)
        else:
            rest = torch.full((log_p.shape[0],), -torch.inf, device=logits.device)
        out.append((top.indices, top.values, rest))
    if not out:
        empty = logits.new_empty(0, k, dtype=torch.float32)
        return empty.long(), empty, empty[:, 0]
    return tuple(torch.cat(part) for part in zip(*out))  # type: ignore[return-value]


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
            for shard in manifest["shards"]:
                if self.shards.get(shard["index"]) is not shard:
                    print(f"{self.out / shard['file']}: {self._damage(shard)}; rewriting it", file=sys.stderr)
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            self.shards = {}
        for stale in self.out.glob(".*.tmp"):  # left by a killed run: never listed, never read
            stale.unlink()
        self._save_manifest()

    def _intact(self, shard: dict) -> bool:
        return self._damage(shard) is None

    def _damage(self, shard: dict) -> str | None:
        """What is wrong with a listed shard's file, or None when it is whole."""
        path = self.out / shard["file"]
        if not path.is_file():
            return "missing"
        if path.stat().st_size != shard["bytes"]:
            return f"truncated or altered ({path.stat().st_size} bytes, manifest says {shard['bytes']})"
        if file_sha256(path) != shard["sha256"]:
            return "checksum mismatch (corrupted)"
        return None

    def _save_manifest(self) -> None:
        shards = [self.shards[i] for i in sorted(self.shards)]
        complete = len(shards) == self.n_shards
        atomic_write_json(self.out / "manifest.json", {**self.header, "complete": complete, "shards": shards})

    def todo(self) -> list[int]:
        return [i for i in range(self.n_shards) if i not in self.shards]

    def write_shard(
        self, index: int, counts: list[int], ids, logprobs, rest, seconds: float | None = None,
        teacher_tokens: list[list[int]] | None = None,
    ) -> None:
        """`teacher_tokens`: a cross-tokenizer cache's teacher tokenization of each example."""
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
        if teacher_tokens is not None:
            lengths = [len(t) for t in teacher_tokens]
            tensors["teacher_offsets"] = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)
            tensors["teacher_tokens"] = torch.tensor([i for t in teacher_tokens for i in t], dtype=torch.int32)
        data = save(tensors)  # the shard's bytes: hashed here, written once, never re-read
        name = f"shard-{index:05d}.safetensors"
        atomic_write_bytes(self.out / name, data)  # temp file, fsync, rename
        self.shards[index] = {
            "index": index,
            "file": name,
            "first_example": index * size,
            "examples": len(counts),
            "tokens": int(ids.shape[0]),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "seconds": seconds,  # the teacher's time on it: budget.json is recomputed from these
        }
        self._save_manifest()

    def budget(self, examples: list[Example], params: int | None) -> dict:
        """teacher_caching totals of the listed shards: tokens read, FLOPs, seconds (null when
        a shard of an older manifest has no seconds), one record per shard. Recomputed from
        the manifest, so a kill between a shard and its budget record loses nothing."""
        size = self.header["shard_examples"]
        shards = [self.shards[i] for i in sorted(self.shards)]
        tokens = sum(len(e.input_ids) for s in shards for e in examples[s["index"] * size : (s["index"] + 1) * size])
        seconds = [s.get("seconds") for s in shards]
        return {
            "tokens": tokens,
            "flops": forward_flops(params, tokens),
            "records": len(shards),
            "seconds": None if any(x is None for x in seconds) else sum(seconds),
        }


def write_teacher_cache(
    cfg,
    out: str | Path,
    top_k: int,
    logprob_dtype: str,
    shard_examples: int,
    batch_size: int,
    show_progress: bool = True,
    server: ServerSettings | None = None,
    teacher_params: int | None = None,
) -> dict:
    """Run cfg.teacher over cfg.data's training examples once; write (or finish) the cache.

    With `server`, the teacher is the model the server serves (`pipeline.served_cache`): the
    examples are tokenized with cfg.teacher's tokenizer (the student's when the config has no
    teacher), the cache's teacher is `server:MODEL`, and the temperature must be 1;
    `teacher_params` (unknown otherwise) makes the FLOPs of budget.json.

    Returns the manifest. The temperature is cfg.objective.temperature: the cached
    log-probabilities are at the loss temperature, so a run must use the same one. The
    teacher's pass is recorded as phase teacher_caching of OUT/budget.json (tokens read,
    2 x params x tokens FLOPs, seconds; totals over every shard the manifest lists, so a
    resumed cache, or one killed between a shard and its record, counts each shard once).
    """
    check_cache_arguments(cfg, server, logprob_dtype, shard_examples, batch_size)
    source = cfg.teacher if cfg.teacher is not None else cfg.student
    tokenizer = build_tokenizer(source, "teacher" if cfg.teacher is not None else "student")
    vocab = len(tokenizer)
    if not 1 <= top_k <= vocab:
        raise DistillError(f"--top-k must be in [1, {vocab}] (the teacher's vocabulary), got {top_k}")
    examples = build_examples(cfg.data, tokenizer)
    identity = {"tokenizer_hash": tokenizer_hash(tokenizer), "dataset_hash": dataset_hash(examples)}
    teacher_tokens = None
    if cfg.objective.cross_tokenizer is not None:  # the student's rows, in the teacher's tokens
        examples, identity = cross_examples(cfg, tokenizer)
        teacher_tokens = [e.input_ids for e in examples]
    header = {
        "teacher": f"server:{server.model}" if server else model_id(cfg.teacher, seeds.teacher_init(cfg.train.seed)),
        **identity,
        "temperature": cfg.objective.temperature,
        "top_k": top_k,
        "logprob_dtype": logprob_dtype,
        "vocab_size": vocab,
        "shard_examples": shard_examples,
    }
    writer = CacheWriter(Path(out), header, len(examples))
    if writer.todo():
        if server is not None:
            params = teacher_params

            def topk(lo: int, hi: int):
                return served_topk(server, examples[lo:hi], top_k, vocab, first_index=lo)
        else:
            teacher = build_model(cfg.teacher, tokenizer, "teacher", seeds.teacher_init(cfg.train.seed))
            device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device == "auto" else "cpu")
            if device.type == "cpu":
                keep_freed_memory()  # the (rows, V) buffers of every batch come from the heap
            teacher.to(device).eval()
            params = count_parameters(teacher)

            def topk(lo: int, hi: int):
                return teacher_topk(
                    teacher, examples[lo:hi], tokenizer.pad_token_id, vocab, top_k, cfg.objective.temperature, batch_size
                )

        write_missing_shards(writer, topk, examples, Path(out), params, show_progress, teacher_tokens)
    return read_manifest(Path(out))


def cross_examples(cfg, teacher_tokenizer) -> tuple[list[Example], dict]:
    """A cross-tokenizer cache's examples: each student example's text in the teacher's
    tokens, every position a target; and the cache's identity (the student's tokenizer and
    examples, and the teacher's tokenizer)."""
    s_tok = build_tokenizer(cfg.student, "student")
    s_examples = build_examples(cfg.data, s_tok)
    retok = Retokenizer(teacher_tokenizer, s_tok)
    examples = []
    for e in s_examples:
        t_ids = retok.teacher_ids(e)
        examples.append(Example(t_ids, [IGNORE_INDEX] + t_ids[1:]))
    identity = {
        "tokenizer_hash": tokenizer_hash(s_tok),
        "dataset_hash": dataset_hash(s_examples),
        "cross_tokenizer": True,
        "teacher_tokenizer_hash": tokenizer_hash(teacher_tokenizer),
    }
    return examples, identity


def check_cache_arguments(cfg, server: ServerSettings | None, logprob_dtype: str, shard_examples: int, batch_size: int) -> None:
    """The settings of `distill cache`, checked before anything is read or written."""
    if cfg.teacher is None and server is None:
        raise DistillError("distill cache needs a 'teacher' section in the run config (or --server)")
    if server is not None and cfg.objective.temperature != 1.0:
        raise DistillError(
            f"objective.temperature is {cfg.objective.temperature:g}: a server's prompt log-probs are at temperature 1 "
            "and a top-k cannot be re-tempered; cache at objective.temperature=1"
        )
    if logprob_dtype not in LOGPROB_DTYPES:
        raise DistillError(f"--dtype must be one of {sorted(LOGPROB_DTYPES)}, got {logprob_dtype!r}")
    if shard_examples < 1 or batch_size < 1:
        raise DistillError("--shard-examples and --batch-size must be >= 1")


def write_missing_shards(
    writer: CacheWriter, topk, examples: list[Example], out: Path, params: int | None, show_progress: bool,
    teacher_tokens: list[list[int]] | None = None,
) -> None:
    """Write every shard the manifest does not list yet, `topk(lo, hi)` giving the teacher's
    top-k of examples lo..hi; budget.json's teacher_caching phase after each shard."""
    size = writer.header["shard_examples"]
    counts = target_counts(examples)
    todo = writer.todo()
    done = writer.n_shards - len(todo)
    progress = Progress(writer.n_shards, done, enabled=show_progress, label="cache")
    for index in todo:
        t0 = time.perf_counter()
        lo, hi = index * size, min((index + 1) * size, len(examples))
        ids, logprobs, rest = topk(lo, hi)
        tokens = teacher_tokens[lo:hi] if teacher_tokens is not None else None
        writer.write_shard(index, counts[lo:hi], ids, logprobs, rest, seconds=time.perf_counter() - t0, teacher_tokens=tokens)
        # Recomputed from the manifest at every shard: a killed and resumed cache counts
        # every listed shard once, even one whose record the kill cut off.
        record_phase(out / rundir.BUDGET, "teacher_caching", totals=writer.budget(examples, params))
        done += 1
        progress.update(done, float("nan"), 0.0)
    progress.close()
