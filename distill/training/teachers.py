"""Teachers: where a micro-batch's logit terms (task CE and the KD divergence) come from.

Every kind answers the same three questions for the loop, so the loop never asks which
kind it has:

    attach(batch, indices, examples)
                                what the teacher adds to a collated batch (a cache: top-k;
                                another tokenizer: its tokens of the same rows)
    forward(batch)              the teacher model's outputs, no grad (None without a model)
    logit_terms(s_out, t_out, batch, weights)
                                (weighted loss sum, {"task_ce": sum, "kd": sum}) over the
                                batch's valid tokens

Kinds: `NoTeacher` (labels only), `LiveTeacher` (a model in this process, fused with both
lm_heads or on full logits), `CachedTeacher` (top-k from `distill cache`, no model), and for
a teacher of another tokenizer `CrossTokenizerTeacher` / `CrossCachedTeacher`
(`distill.training.cross_teacher`). A new kind is one more class with these methods and one
line in `build_teacher_source`.
"""

from typing import Protocol

import torch

from distill.config import RunConfig
from distill.data.packing import model_inputs
from distill.data.rows import Example, collate
from distill.data.teacher_cache import TeacherCache
from distill.errors import DistillError
from distill.loss.terms import (
    combine,
    fused_sparse_term_sums,
    fused_term_sums,
    head_matches_logits,
    sparse_term_sums,
    term_sums,
)
from distill.models.last_position import last_position
from distill.training.cross_teacher import CrossCachedTeacher, CrossTokenizerTeacher, Retokenizer

Terms = tuple[torch.Tensor, dict[str, torch.Tensor]]


class Teacher(Protocol):
    kind: str | None  # "live", "cache" or None: what train_summary.json records
    fused: bool  # the student runs with logits_to_keep=1 and hands its hidden states over
    model: torch.nn.Module | None  # the teacher model, where there is one (features, probe)

    def attach(self, batch: dict[str, torch.Tensor], indices: list[int], examples: list[Example]) -> dict[str, torch.Tensor]: ...

    def forward(self, batch: dict[str, torch.Tensor]): ...

    def logit_terms(self, s_out, t_out, batch: dict[str, torch.Tensor], weights: tuple[float, float]) -> Terms: ...


class _Objective:
    """The objective settings every kind reads."""

    def __init__(self, cfg: RunConfig, vocab: int):
        obj = cfg.objective
        self.vocab, self.temperature, self.divergence = vocab, obj.temperature, obj.divergence
        self.params, self.chunk_size = obj.divergence_params(), obj.chunk_size

    def attach(self, batch: dict[str, torch.Tensor], indices: list[int], examples: list[Example]) -> dict[str, torch.Tensor]:
        return batch

    def forward(self, batch: dict[str, torch.Tensor]):
        return None


class NoTeacher(_Objective):
    """Labels only: the task CE on the student's logits."""

    kind, fused, model = None, False, None

    def logit_terms(self, s_out, t_out, batch, weights) -> Terms:
        terms = term_sums(s_out.logits, batch["labels"], None, self.vocab, self.temperature, self.divergence, self.params)
        return combine(terms, *weights), terms


class LiveTeacher(_Objective):
    """A teacher model in this process. `kd` False: it is here for the feature term alone
    (alpha = 0), so only its hidden states are computed."""

    kind = "live"

    def __init__(self, cfg: RunConfig, vocab: int, model, student_head, fused: bool, states: bool):
        super().__init__(cfg, vocab)
        self.model, self.fused, self.states = model, fused, states or fused
        self.kd = cfg.objective.alpha > 0
        self.student_head, self.head = student_head, model.get_output_embeddings()

    def forward(self, batch: dict[str, torch.Tensor]):
        only_states = self.fused or not self.kd
        with torch.no_grad():
            return self.model(
                **model_inputs(batch),  # the student's positions and mask: the same context
                output_hidden_states=self.states,
                **({"logits_to_keep": last_position(batch["input_ids"])} if only_states else {}),  # skips the (B, T, V) logits
            )

    def logit_terms(self, s_out, t_out, batch, weights) -> Terms:
        if self.fused:
            return fused_term_sums(
                s_out.hidden_states[-1], self.student_head, t_out.hidden_states[-1], self.head, batch["labels"],
                self.vocab, *weights, self.temperature, self.divergence, self.params, self.chunk_size,
            )
        teacher_logits = t_out.logits if self.kd else None  # (B, T, V)
        terms = term_sums(s_out.logits, batch["labels"], teacher_logits, self.vocab, self.temperature, self.divergence, self.params)
        return combine(terms, *weights), terms


class CachedTeacher(_Objective):
    """The teacher's top-k from an offline cache: no teacher model at all."""

    kind, model = "cache", None

    def __init__(self, cfg: RunConfig, vocab: int, cache: TeacherCache, student_head, fused: bool):
        super().__init__(cfg, vocab)
        self.cache, self.student_head, self.fused = cache, student_head, fused

    def attach(self, batch: dict[str, torch.Tensor], indices: list[int], examples: list[Example]) -> dict[str, torch.Tensor]:
        return self.cache.attach(batch, indices)

    def logit_terms(self, s_out, t_out, batch, weights) -> Terms:
        cached = (batch["teacher_ids"], batch["teacher_logprobs"], batch["teacher_rest"])
        if self.fused:
            return fused_sparse_term_sums(
                s_out.hidden_states[-1], self.student_head, batch["labels"], *cached, self.vocab, *weights,
                self.temperature, self.divergence, self.params, self.chunk_size,
            )
        terms = sparse_term_sums(s_out.logits, batch["labels"], *cached, self.vocab, self.temperature, self.divergence, self.params)
        return combine(terms, *weights), terms


def use_fused_path(cfg: RunConfig, student, teacher_model, cache, examples, pad_id: int, device) -> bool:
    """The fused lm_head path is taken when there is a KD term and every model's logits are
    a plain lm_head of its last hidden state (checked on a two-example probe batch);
    objective.fused=true makes that a requirement, false turns the path off."""
    if (teacher_model is None and cache is None) or cfg.objective.alpha == 0 or cfg.objective.fused is False:
        return False
    if cfg.objective.cross_tokenizer is not None:  # two vocabularies: the KD term is taken at aligned pairs
        return False
    sample = {k: v.to(device) for k, v in collate(examples[:2], pad_id).items()}
    models = [student] + ([teacher_model] if teacher_model is not None else [])
    # Under the run's autocast, as in training: bf16 logits are then compared with bf16 logits.
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
        fused = all(head_matches_logits(m, **model_inputs(sample)) for m in models)
    if not fused and cfg.objective.fused:
        raise DistillError("objective.fused=true, but a model's logits are not a plain lm_head of its hidden states")
    return fused


def pad_id(tokenizer) -> int:
    for special in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if special is not None:
            return special
    return 0


def build_teacher_source(
    cfg: RunConfig, vocab: int, teacher_model, cache: TeacherCache | None, student, fused: bool, states: bool,
    retok: Retokenizer | None = None,
) -> Teacher:
    """The run's teacher kind. `student` is the unwrapped student (its lm_head feeds the
    fused path); `states`: a loss term other than the logit terms needs hidden states;
    `retok`: the student -> teacher retokenizer of a cross-tokenizer run."""
    head = student.get_output_embeddings()
    if retok is not None:  # objective.cross_tokenizer: the teacher speaks another vocabulary
        if cache is not None:
            return CrossCachedTeacher(cfg, vocab, cache, retok)
        if teacher_model is not None:
            return CrossTokenizerTeacher(cfg, vocab, teacher_model, retok, pad_id(retok.t_tok))
    if cache is not None:
        return CachedTeacher(cfg, vocab, cache, head, fused)
    if teacher_model is not None:
        return LiveTeacher(cfg, vocab, teacher_model, head, fused, states)
    return NoTeacher(cfg, vocab)
