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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from distill.config import RunConfig
from distill.data.rows import Example, step_micro_batches
from distill.errors import DistillError
from distill.training.on_policy import Sampler, is_on_policy_step, sample_examples
from distill.training.rollout import Rollout, StaticDecode


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
    this process's prompts with the weights of the start of the step; with on_policy.overlap,
    with the weights of the start of the step before, sampled in a background thread while
    that step trained (`RolloutAhead`)."""

    def __init__(self, cfg: RunConfig, dataset: DatasetSource, acc, student, tokenizer, timer, indices_of):
        self.cfg, self.dataset, self.acc, self.student, self.tokenizer = cfg, dataset, acc, student, tokenizer
        self.timer = timer  # seconds since a start, after the device's queued work
        self.indices_of = indices_of  # step -> this process's example indices
        t = cfg.train
        self.global_batch = t.micro_batch_size * t.grad_accum * acc.num_processes  # prompts per step, all processes
        op = cfg.on_policy
        self.sampler = Sampler(op.sample_dtype, keep_copy=op.overlap or op.compile_decode)
        self.static = StaticDecode() if op.compile_decode else None
        self.ahead = RolloutAhead(acc.device) if cfg.on_policy.overlap else None

    def is_on_policy(self, step: int) -> bool:
        return step < self.cfg.train.steps and is_on_policy_step(self.cfg.train.seed, step, self.cfg.on_policy.lmbda)

    def sample(self, model, step: int, indices: list[int], seconds=None) -> tuple[list[Example], Rollout, float]:
        """The examples at `indices` with completions sampled by `model`, the rollout, its
        seconds (by `seconds(since)`; default: the loop's timer, after the device's work)."""
        t0, tok, seconds = time.perf_counter(), self.tokenizer, seconds or self.timer
        with self.acc.autocast():
            sampled, done = sample_examples(
                model, self.dataset.task_examples[0], indices, self.cfg.on_policy,
                tok.eos_token_id, tok.pad_token_id, self.cfg.train.seed, step, self.static,
            )
        return sampled, done, seconds(t0)

    def step_examples(self, step: int, indices: list[int]) -> StepExamples:
        got = None
        if self.is_on_policy(step):
            t0 = time.perf_counter()
            if self.ahead is not None and self.ahead.step == step:
                policy_step, (sampled, done, rollout_s) = step - 1, self.ahead.result(indices)
            else:  # the first rollout of a run (or of a resume), or no overlap
                policy_step, model = step, self.sampler(self.acc.unwrap_model(self.student))
                sampled, done, rollout_s = self.sample(model, step, indices)
            wait_s = time.perf_counter() - t0
            counts = self.acc.reduce(torch.tensor([done.generated_tokens, sum(done.ended)], device=self.acc.device), "sum")
            record = {
                "on_policy": True, "policy_step": policy_step, "rollout_s": rollout_s,
                "generated_tokens": counts[0].item(), "eos_rate": counts[1].item() / self.global_batch,
            }
            if self.ahead is not None:
                record["rollout_wait_s"] = wait_s  # what this step waited for its samples
            got = StepExamples([dict(zip(indices, sampled))], on_policy=True, record=record)
        if self.ahead is not None and self.is_on_policy(step + 1):  # sampled with this step's start weights
            model = self.sampler(self.acc.unwrap_model(self.student))
            self.ahead.start(step + 1, self.indices_of(step + 1), lambda idx, sec: self.sample(model, step + 1, idx, sec))
        return got or StepExamples(self.dataset.task_examples, record={"on_policy": False})


class RolloutAhead:
    """One rollout in a background thread: started with the weights of one step's start,
    collected by the next step. On CUDA it runs on a stream of its own, after the work
    queued so far (the refresh of the weights it reads)."""

    def __init__(self, device: torch.device):
        self.device, self.step, self.indices, self.future = device, None, None, None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-ahead")

    def start(self, step: int, indices: list[int], sample) -> None:
        stream = None
        if self.device.type == "cuda":
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
        self.step, self.indices = step, indices
        self.future = self.pool.submit(self._run, sample, indices, stream)

    @staticmethod
    def _run(sample, indices: list[int], stream):
        """sample(indices, seconds): timed by this stream's work alone, not the update's."""
        if stream is None:
            return sample(indices, lambda since: time.perf_counter() - since)
        with torch.cuda.stream(stream):
            return sample(indices, lambda since: (stream.synchronize(), time.perf_counter() - since)[1])

    def result(self, indices: list[int]):
        if indices != self.indices:
            raise DistillError(f"on_policy.overlap: step {self.step + 1} was sampled ahead for other examples than it trains on")
        future, self.step, self.indices, self.future = self.future, None, None, None
        return future.result()


def build_batch_source(
    cfg: RunConfig, task_examples: list[list[Example]], acc, student, tokenizer, timer, n_examples: int
) -> BatchSource:
    dataset = DatasetSource(task_examples)
    if cfg.on_policy.lmbda > 0:
        t = cfg.train

        def indices_of(step: int) -> list[int]:
            mbs = step_micro_batches(
                step, n_examples, t.micro_batch_size, t.grad_accum, t.seed, acc.process_index, acc.num_processes
            )
            return [i for mb in mbs for i in mb]

        return OnPolicySource(cfg, dataset, acc, student, tokenizer, timer, indices_of)
    return dataset
