"""The step's objective: the teacher's logit terms plus any extra loss terms.

    loss = (1 - alpha) * task_ce + alpha * T^2 * D        (`distill.training.teachers`)
         + sum over extra terms of weight * term          (here: the feature term)

An extra term is a callable `(student outputs, teacher outputs, batch) -> (weighted sum,
{name: sum})` with a `needs_hidden_states` flag; every term is a sum over the batch's
valid tokens, so the loop normalises them all by the same global count. A new term is a
new class with that call and one line in `build_extra_terms`.
"""

from typing import Protocol

import torch

from distill.config import FeatureConfig
from distill.data.packing import document_starts, model_inputs
from distill.loss.token_losses import IGNORE_INDEX
from distill.models.last_position import last_position
from distill.training.features import Pair, feature_term_sum


class LossTerm(Protocol):
    needs_hidden_states: bool

    def __call__(self, s_out, t_out, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class FeatureTerm:
    """beta * the weighted mean over layer pairs of the feature loss between projected
    student states and teacher states, on the positions the logit terms count."""

    needs_hidden_states = True

    def __init__(self, projectors: torch.nn.Module, pairs: list[Pair], fcfg: FeatureConfig):
        self.projectors, self.pairs, self.cfg = projectors, pairs, fcfg

    def __call__(self, s_out, t_out, batch):
        mask = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)  # (B, T)
        mask[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX  # the positions the other terms count
        if self.cfg.skip_first_token:  # every document's first token: each packed row has its own sink
            mask &= ~document_starts(batch)
        feature = feature_term_sum(self.projectors, self.pairs, self.cfg.loss, s_out.hidden_states, t_out.hidden_states, mask)
        return self.cfg.weight * feature, {"feature": feature}


def build_extra_terms(fcfg: FeatureConfig, projectors, pairs: list[Pair] | None) -> list[LossTerm]:
    """The run's terms beyond the logit terms (projectors: the prepared module, or None)."""
    return [FeatureTerm(projectors, pairs, fcfg)] if projectors is not None else []


def micro_batch_objective(student, teacher, terms: list[LossTerm], batch, t_out, weights) -> tuple[torch.Tensor, dict]:
    """(weighted loss sum, {term: sum}) of one micro-batch: the student's forward, the
    teacher's logit terms, then each extra term. t_out: `teacher.forward(batch)`."""
    inputs = model_inputs(batch)  # packed blocks: per-row positions, attention kept inside each row
    states = teacher.fused or any(t.needs_hidden_states for t in terms)
    # logits_to_keep: the model skips its own (B, T, V) logits on the fused path.
    last = {"logits_to_keep": last_position(batch["input_ids"])} if teacher.fused else {}
    s_out = student(**inputs, output_hidden_states=states, **last)
    loss, sums = teacher.logit_terms(s_out, t_out, batch, weights)
    for term in terms:
        weighted, values = term(s_out, t_out, batch)
        loss = loss + weighted  # (1 - alpha) CE + alpha T^2 D + beta * feature
        sums.update(values)
    return loss, sums
