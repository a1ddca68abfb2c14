"""Batch sources: the examples an optimizer step trains on.

    step_examples(step, indices) -> StepExamples

`DatasetSource` hands out the dataset's examples (one list per task: the label task, and
the rationale task of step-by-step multitask training). `OnPolicySource` (GKD) replaces,
on the steps its (seed, step) draw picks, the completions with samples from the current
student, for the teacher to score. A new source is one class with `step_examples` and one
line in `build_batch_source`.
"""

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from distill.config import RunConfig
from distill.data.rows import Example
from distill.training.on_policy import Sampler, is_on_policy_step, sample_examples


@dataclass
class StepExamples:
    tasks: list[Sequence[Example] | Mapping[int, Example]]
    """Per task, the examples by dataset index (a mapping: only this process's indices)."""
    on_policy: bool = False
    """Student samples: the task CE is left out (it would teach the student its own samples)."""
    record: dict = field(default_factory=dict)
    """What metrics.jsonl records of how the examples were made."""


class BatchSource(Protocol):
    def step_examples(self, step: int, indices: list[int]) -> StepExamples: ...


class DatasetSource:
    def __init__(self, task_examples: list[list[Example]]):
        self.task_examples = task_examples

    def step_examples(self, step: int, indices: list[int]) -> StepExamples:
        return StepExamples(self.task_examples)


class OnPolicySource:
    """With probability lmbda per step (the same draw on every process), one rollout of all
    this process's prompts with the weights of the start of the step."""

    def __init__(self, cfg: RunConfig, dataset: DatasetSource, acc, student, tokenizer, timer):
        self.cfg, self.dataset, self.acc, self.student, self.tokenizer = cfg, dataset, acc, student, tokenizer
        self.timer = timer  # seconds since a start, after the device's queued work
        t = cfg.train
        self.global_batch = t.micro_batch_size * t.grad_accum * acc.num_processes  # prompts per step, all processes
        self.sampler = Sampler(cfg.on_policy.sample_dtype)

    def step_examples(self, step: int, indices: list[int]) -> StepExamples:
        t0, seed = time.perf_counter(), self.cfg.train.seed
        if not is_on_policy_step(seed, step, self.cfg.on_policy.lmbda):
            return StepExamples(self.dataset.task_examples, record={"on_policy": False})
        acc, tok = self.acc, self.tokenizer
        with acc.autocast():
            sampled, done = sample_examples(
                self.sampler(acc.unwrap_model(self.student)), self.dataset.task_examples[0], indices, self.cfg.on_policy,
                tok.eos_token_id, tok.pad_token_id, seed, step,
            )
        counts = acc.reduce(torch.tensor([done.generated_tokens, sum(done.ended)], device=acc.device), "sum")
        record = {
            "on_policy": True, "policy_step": step, "rollout_s": self.timer(t0),
            "generated_tokens": counts[0].item(), "eos_rate": counts[1].item() / self.global_batch,
        }
        return StepExamples([dict(zip(indices, sampled))], on_policy=True, record=record)


def build_batch_source(cfg: RunConfig, task_examples: list[list[Example]], acc, student, tokenizer, timer) -> BatchSource:
    dataset = DatasetSource(task_examples)
    if cfg.on_policy.lmbda > 0:
        return OnPolicySource(cfg, dataset, acc, student, tokenizer, timer)
    return dataset
