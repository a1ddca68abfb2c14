"""The on-policy batch source (GKD): completions sampled from the student, for the teacher
to score.

At each optimizer step one draw from (seed, step) decides, with probability lmbda, whether
the step's prompts get student-sampled completions; every process computes the same draw,
so all ranks take the same kind of step without talking. Each process samples the
completions of all its micro-batches in one rollout (not one per micro-batch), with the
weights of the start of the step, then splits them back into micro-batches. A sharded
student (train.sharding: fsdp) is gathered whole in each process for the rollout, so each
process samples on its own. The prompt stays masked out of the loss; the completion (and EOS when sampled) is what the teacher
and student are compared on. A chat row's prompt is its conversation up to the last
assistant turn: the student writes that turn (earlier assistant turns are context).
"""

import copy

import torch

from distill import seeds
from distill.config import OnPolicyConfig
from distill.data import chat
from distill.data.rows import Example
from distill.errors import DistillError
from distill.loss.token_losses import IGNORE_INDEX
from distill.training.rollout import Rollout, Sampling, StaticDecode, rollout
from distill.training.sharding import gathered


def sampling_of(cfg: OnPolicyConfig) -> Sampling:
    return Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_new_tokens)


def is_on_policy_step(seed: int, step: int, lmbda: float) -> bool:
    """The step's draw: a pure function of (seed, step), identical on every process."""
    if lmbda <= 0:
        return False
    g = torch.Generator().manual_seed(seeds.on_policy_draw(seed, step))
    return torch.rand(1, generator=g, dtype=torch.float64).item() < lmbda


def example_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of one example at one step: rows do not share noise, and a resumed
    run redraws exactly what the uninterrupted one drew."""
    return seeds.rollout_row(seed, step, index)


def prompt_length(example: Example) -> int:
    """Tokens before the last supervised span: the prompt of a prompt/completion row; of a
    chat row, the conversation before its last assistant turn with the template's generation
    prompt (`distill.data.chat`), which the student continues. No label: the whole example."""
    labels = example.labels
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    if end == 0:
        return len(labels)
    start = end - 1
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


def check_prompts(examples: list[Example], max_new_tokens: int, max_length: int) -> None:
    """Every example needs a prompt to sample from, and room for a full completion."""
    for i, e in enumerate(examples):
        n = prompt_length(e)
        if n == 0:
            raise DistillError(f"on_policy: training row {i + 1} has an empty prompt; student samples need a prompt to continue")
        if n + max_new_tokens > max_length:
            raise DistillError(
                f"on_policy: training row {i + 1} has a {n}-token prompt; with on_policy.max_new_tokens={max_new_tokens} "
                f"it can exceed data.max_length={max_length}"
            )


class Sampler:
    """The model rollouts run on: the student itself (on_policy.sample_dtype float32), or a
    copy of its weights in the sample dtype (bf16; or float32 with `keep_copy`, for rollouts
    that run while the student trains or through a compiled step), made once and refreshed
    from the student before each rollout. Only parameters are cast: buffers (rotary
    frequencies) stay as the student has them."""

    def __init__(self, dtype: str, keep_copy: bool = False):
        self.dtype, self.keep_copy, self.copy = dtype, keep_copy, None

    @torch.no_grad()
    def __call__(self, model):
        if self.dtype == "float32" and not self.keep_copy:
            return model
        if self.copy is None:
            self.copy = copy.deepcopy(model).eval()
            for p in self.copy.parameters():
                p.requires_grad_(False)
                p.data = p.data.to(getattr(torch, self.dtype))
        else:
            for mine, theirs in zip(self.copy.parameters(), model.parameters(), strict=True):
                mine.copy_(theirs)
        return self.copy


def sampled_turn(messages):
    """A chat row's conversation before its last assistant turn, then that turn as the sample
    (content `cross_teacher.SAMPLE`, the example's labelled tokens): what a teacher of
    another tokenizer renders. None for a plain row."""
    if messages is None:
        return None
    k = chat.last_assistant(messages)
    return tuple(messages[:k]) + (("assistant", None),)


def sample_examples(
    model,
    examples: list[Example],
    indices: list[int],
    cfg: OnPolicyConfig,
    eos_id: int,
    pad_id: int,
    seed: int,
    step: int,
    static: StaticDecode | None = None,
) -> tuple[list[Example], Rollout]:
    """The examples at `indices` with their completions replaced by student samples
    (labels: IGNORE_INDEX on the prompt, the sampled ids after it; `static`: how the
    rollouts decode with on_policy.compile_decode)."""
    prompts = [examples[i].input_ids[: prompt_length(examples[i])] for i in indices]
    seeds = [example_seed(seed, step, i) for i in indices]
    size = cfg.rollout_batch_size or max(len(prompts), 1)
    was_training = model.training
    model.eval()
    try:
        with gathered(model):  # a sharded student: whole in each process while it samples
            parts = [
                rollout(model, prompts[j : j + size], sampling_of(cfg), eos_id, pad_id, seeds[j : j + size], static=static)
                for j in range(0, len(prompts), size)
            ]
    finally:
        model.train(was_training)
    done = Rollout([c for p in parts for c in p.completions], [e for p in parts for e in p.ended])
    out = [
        Example(p + c, [IGNORE_INDEX] * len(p) + c, messages=sampled_turn(examples[i].messages))
        for i, p, c in zip(indices, prompts, done.completions)
    ]
    return out, done
