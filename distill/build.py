"""Builders: config sections -> objects (models, tokenizers, datasets)."""

import torch

from distill.config import DataConfig, ModelConfig, RunConfig
from distill.data import Example, Row, load_rows, tokenize_rows
from distill.errors import ConfigError
from distill.models import check_vocabularies, load_causal_lm, load_tokenizer
from distill.tasks.tokenizer import chain_tokenizer


def build_tokenizer(mcfg: ModelConfig, role: str):
    if mcfg.tokenizer == "builtin":
        return chain_tokenizer()
    if mcfg.tokenizer is not None:
        return load_tokenizer(mcfg.tokenizer)
    if mcfg.name is None:
        raise ConfigError(f"{role}.tokenizer is required with an inline {role}.config ('builtin' or a hub id/folder)")
    return load_tokenizer(mcfg.name, mcfg.gguf_file)


def build_model(mcfg: ModelConfig, tokenizer, role: str, seed: int):
    """Load or create a causal LM. Inline configs get the tokenizer's size and special ids."""
    if mcfg.config is not None:
        config = dict(mcfg.config)
        config.setdefault("vocab_size", len(tokenizer))
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(tokenizer, key, None) is not None:
                config.setdefault(key, getattr(tokenizer, key))
        torch.manual_seed(seed)  # the same seed gives the same initial weights
        return load_causal_lm(config=config, dtype=mcfg.dtype)
    return load_causal_lm(name=mcfg.name, gguf_file=mcfg.gguf_file, dtype=mcfg.dtype)


def output_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def build_models(cfg: RunConfig):
    """Student, teacher (or None), the student's tokenizer and the shared real vocab size."""
    s_tok = build_tokenizer(cfg.student, "student")
    student = build_model(cfg.student, s_tok, "student", cfg.train.seed)
    if cfg.objective.alpha == 0 or cfg.teacher is None:
        return student, None, s_tok, len(s_tok)
    t_tok = build_tokenizer(cfg.teacher, "teacher")
    teacher = build_model(cfg.teacher, t_tok, "teacher", cfg.train.seed + 1)
    vocab = check_vocabularies(t_tok, s_tok, output_size(teacher), output_size(student))
    teacher.eval().requires_grad_(False)
    return student, teacher, s_tok, vocab


def build_rows(dcfg: DataConfig, split: str) -> list[Row]:
    if split == "train":
        return load_rows(dcfg.source, "train", dcfg.n_train, dcfg.seed, dcfg.min_ops, dcfg.max_ops)
    if dcfg.source.startswith("builtin:"):
        return load_rows(dcfg.source, split, dcfg.n_test, dcfg.seed, dcfg.min_ops, dcfg.max_ops)
    if dcfg.eval_source is None:
        return []
    return load_rows(dcfg.eval_source, split, dcfg.n_test, dcfg.seed, dcfg.min_ops, dcfg.max_ops)[: dcfg.n_test]


def build_examples(dcfg: DataConfig, tokenizer) -> list[Example]:
    rows = build_rows(dcfg, "train")
    return tokenize_rows(rows, tokenizer, dcfg.max_length, source=dcfg.source)
