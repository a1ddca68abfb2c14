"""One optimizer step: a global batch, split into micro-batches, every term normalised by
the global count of valid tokens.

The global batch of step s is the same examples whatever the process count
(`distill.data.rows.global_batch_indices`); rank r takes micro-batches r, r + world, ...
DDP and FSDP average gradients over processes, so each micro-batch's loss is scaled by
world / global valid tokens: 1 process x 8 micro-batches, 8 x 1 and 2 x 4 take one step.
"""

import contextlib
import math
import time

import torch

from distill.data.rationale import TASK_NAMES
from distill.data.rows import collate, step_micro_batches
from distill.errors import DistillError
from distill.loss.token_losses import IGNORE_INDEX
from distill.training import sharding
from distill.training.batch_sources import StepExamples
from distill.training.objective import micro_batch_objective
from distill.training.setup import Run, timer


def step_batches(run: Run, mbs: list[list[int]], got: StepExamples) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """(task, batch on the device) for each micro-batch and task, in micro-batch order."""
    batches = []
    for mb in mbs:
        for task, examples in enumerate(got.tasks):
            chosen = [examples[i] for i in mb]
            batch = run.teacher.attach(collate(chosen, run.tokenizer.pad_token_id), mb, chosen)
            batches.append((task, {k: v.to(run.acc.device) for k, v in batch.items()}))
    return batches


def global_valid_tokens(run: Run, batches) -> list[float]:
    """Each task's count of valid (next-token target) tokens over all processes."""
    local = torch.zeros(len(run.task_weights), dtype=torch.float64, device=run.acc.device)  # (tasks,)
    for task, b in batches:
        local[task] += (b["labels"][:, 1:] != IGNORE_INDEX).sum()
    return run.acc.reduce(local, "sum").tolist()


def accumulate(run: Run, batches, n_task: list[float], weights, drop_task_ce: bool) -> tuple[dict, float]:
    """Forward and backward of every micro-batch; gradients sync on the last one only.
    Returns the per-term sums of this process ({task prefix + name: sum}) and the seconds
    spent in the teacher's forwards."""
    acc, world, seconds = run.acc, run.acc.num_processes, timer(run.acc)
    sums: dict[str, torch.Tensor] = {}
    teacher_s = 0.0
    for i, (task, batch) in enumerate(batches):
        last = i == len(batches) - 1
        with contextlib.ExitStack() as stack:
            for model in run.trained if not last else []:
                stack.enter_context(sharding.gradient_sync_off(acc, model))
            with acc.autocast():
                t1 = time.perf_counter()
                t_out = run.teacher.forward(batch)
                teacher_s += seconds(t1)
                loss, terms = micro_batch_objective(run.student, run.teacher, run.terms, batch, t_out, weights)
            if drop_task_ce:
                terms.pop("task_ce")  # the student's likelihood of its own samples: not a task loss
            # DDP averages gradients over processes; scaling by world size turns that
            # average back into the global sum / global valid-token count.
            acc.backward(loss * world * run.task_weights[task] / max(n_task[task], 1.0))
        for k, v in {**terms, "loss": loss}.items():
            name = TASK_NAMES[task] + k
            sums[name] = sums.get(name, 0.0) + v.detach().double()
    return sums, teacher_s


def term_means(run: Run, sums: dict, n_task: list[float]) -> dict[str, float]:
    """Global per-token means of every term; multitask adds label_loss and the weighted loss."""
    names = sorted(sums)
    totals = run.acc.reduce(torch.stack([sums[k] for k in names]), "sum")
    out = {}
    for name, total in zip(names, totals.tolist()):
        task = 1 if name.startswith(TASK_NAMES[1]) else 0
        out[name] = total / max(n_task[task], 1.0)
    if len(run.task_weights) > 1:  # L_label + lambda * L_rationale
        out["label_loss"] = out["loss"]
        out["loss"] = out["label_loss"] + run.task_weights[1] * out.pop("rationale_loss")
    return out


def update(run: Run, step: int, loss: float) -> tuple[float, float | None]:
    """Clip, step the optimizer and the schedule. Returns (the step's lr, grad norm). A
    non-finite loss stops the run before the update."""
    t = run.cfg.train
    if not math.isfinite(loss):
        run.optimizer.zero_grad(set_to_none=True)
        last = run.last_checkpoint
        where = f"last good checkpoint: {last}" if last else "no checkpoint was saved yet"
        raise DistillError(f"loss became {loss} at step {step + 1}; stopped before updating ({where})")
    grad_norm = None
    if t.max_grad_norm is not None:
        grad_norm = sharding.clip_grad_norm(run.acc, [p for m in run.trained for p in m.parameters()], t.max_grad_norm)
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return lr, grad_norm


def train_step(run: Run, step: int) -> tuple[dict, int]:
    """Optimizer step `step` (0-based). Returns its metrics.jsonl record and the tokens it
    read over all processes."""
    t0, t, acc = time.perf_counter(), run.cfg.train, run.acc
    mbs = step_micro_batches(
        step, run.n_examples, t.micro_batch_size, t.grad_accum, t.seed, acc.process_index, acc.num_processes
    )
    got = run.source.step_examples(step, [i for mb in mbs for i in mb])
    record = dict(got.record)
    batches = step_batches(run, mbs, got)
    weights = run.cfg.objective.term_weights()
    if got.on_policy:  # on student samples the task CE is left out
        weights = (0.0, weights[1])
    n_task = global_valid_tokens(run, batches)
    sums, teacher_s = accumulate(run, batches, n_task, weights, drop_task_ce=got.on_policy)
    record.update(term_means(run, sums, n_task))
    lr, grad_norm = update(run, step, record["loss"])
    local_tokens = torch.as_tensor(sum(b["attention_mask"].sum() for _, b in batches), device=acc.device)
    tokens = acc.reduce(local_tokens, "sum").item()
    dt = time.perf_counter() - t0
    record.update(step=step + 1, lr=lr, grad_norm=grad_norm, valid_tokens=sum(n_task), tokens_per_s=tokens / dt)
    record.update(step_s=dt, **({"teacher_s": teacher_s} if run.teacher.model is not None else {}))
    return record, tokens
