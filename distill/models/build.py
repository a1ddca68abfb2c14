"""Builders: config sections -> models and tokenizers."""

import hashlib
import json

import torch

from distill import seeds
from distill.config import ModelConfig, RunConfig
from distill.data.rows import Example
from distill.data.tasks.tokenizer import chain_tokenizer
from distill.data.teacher_cache import TeacherCache, dataset_hash, tokenizer_hash
from distill.errors import ConfigError, DistillError
from distill.models.loading import check_vocabularies, load_causal_lm, load_tokenizer


def build_tokenizer(mcfg: ModelConfig, role: str):
    if mcfg.tokenizer == "builtin":
        return chain_tokenizer()
    if mcfg.tokenizer is not None:
        return load_tokenizer(mcfg.tokenizer)
    if mcfg.name is None:
        raise ConfigError(f"{role}.tokenizer is required with an inline {role}.config ('builtin' or a hub id/folder)")
    return load_tokenizer(mcfg.name, mcfg.gguf_file)


def weights_dtype(mcfg: ModelConfig, role: str) -> str:
    """`mcfg.dtype`, or when null: bfloat16 for a teacher where CUDA is, float32 otherwise."""
    if mcfg.dtype is not None:
        return mcfg.dtype
    return "bfloat16" if role == "teacher" and torch.cuda.is_available() else "float32"


def build_model(mcfg: ModelConfig, tokenizer, role: str, seed: int):
    """Load or create a causal LM (weights in `weights_dtype`). Inline configs get the
    tokenizer's size and special ids."""
    if mcfg.config is not None:
        config = dict(mcfg.config)
        config.setdefault("vocab_size", len(tokenizer))
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(tokenizer, key, None) is not None:
                config.setdefault(key, getattr(tokenizer, key))
        torch.manual_seed(seed)  # the same seed gives the same initial weights
        return load_causal_lm(config=config, dtype=weights_dtype(mcfg, role))
    return load_causal_lm(name=mcfg.name, gguf_file=mcfg.gguf_file, dtype=weights_dtype(mcfg, role))


def model_id(mcfg: ModelConfig, seed: int) -> str:
    """A stable identity of a model source: its name (and GGUF file), or its inline config
    and init seed."""
    if mcfg.name is not None:
        return mcfg.name if mcfg.gguf_file is None else f"{mcfg.name}::{mcfg.gguf_file}"
    digest = hashlib.sha256(json.dumps(mcfg.config, sort_keys=True).encode()).hexdigest()[:12]
    return f"inline:{digest}:seed{seed}"


def output_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def build_models(cfg: RunConfig):
    """Student, teacher (or None), the student's tokenizer and the shared real vocab size."""
    s_tok = build_tokenizer(cfg.student, "student")
    student = build_model(cfg.student, s_tok, "student", seeds.student_init(cfg.train.seed))
    if getattr(student, "distill_quant", None) is not None:
        raise ConfigError(
            f"student.name {cfg.student.name!r} is a quantized model (quant.json) and cannot be trained; "
            "train its full-precision student with quant.scheme set (quantization-aware distillation)"
        )
    needed = cfg.objective.alpha > 0 or cfg.features.weight > 0
    if not needed or cfg.teacher is None or cfg.teacher_cache is not None:
        return student, None, s_tok, len(s_tok)  # a cached teacher is never loaded
    teacher, _, vocab = build_teacher(cfg, s_tok, student)
    return student, teacher, s_tok, vocab


def build_teacher(cfg: RunConfig, student_tokenizer, student):
    """The run's teacher (frozen, eval mode), its tokenizer and the vocabulary size it shares
    with the student (a mismatch is an error)."""
    t_tok = build_tokenizer(cfg.teacher, "teacher")
    teacher = build_model(cfg.teacher, t_tok, "teacher", seeds.teacher_init(cfg.train.seed))
    if cfg.objective.cross_tokenizer is not None:  # two vocabularies, aligned by bytes: the student's size
        vocab = len(student_tokenizer)
    else:
        try:
            vocab = check_vocabularies(t_tok, student_tokenizer, output_size(teacher), output_size(student))
        except DistillError as e:
            raise DistillError(f"{e} (a teacher of another tokenizer: set objective.cross_tokenizer=bucket)") from None
    teacher.eval().requires_grad_(False)
    return teacher, t_tok, vocab


def build_teacher_cache(cfg: RunConfig, tokenizer, examples: list[Example], student_vocab: int):
    """The run's verified `TeacherCache`, or None without `teacher_cache` (or at alpha = 0)."""
    if cfg.teacher_cache is None or cfg.objective.alpha == 0:
        return None
    expected = {
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "dataset_hash": dataset_hash(examples),
        "temperature": cfg.objective.temperature,
        "teacher": None if cfg.teacher is None else model_id(cfg.teacher, seeds.teacher_init(cfg.train.seed)),
    }
    if cfg.objective.cross_tokenizer is not None:  # the teacher's own ids, aligned at attach time
        expected["cross_tokenizer"] = True
        expected["teacher_tokenizer_hash"] = tokenizer_hash(build_tokenizer(cfg.teacher, "teacher"))
        return TeacherCache(cfg.teacher_cache, expected)
    cache = TeacherCache(cfg.teacher_cache, expected)
    if cache.vocab_size > student_vocab:
        raise ConfigError(f"teacher_cache: vocabulary {cache.vocab_size} > the student's output size {student_vocab}")
    return cache
