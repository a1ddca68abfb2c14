"""The one training loop, on Hugging Face Accelerate: one process, DDP or FSDP alike.

Recipes differ in their batch source and objective terms, not in this loop. Each optimizer
step takes one global batch (the same examples whatever the process count), splits it into
micro-batches, and divides every loss term by the global count of valid tokens, so
1 process x 8 micro-batches, 8 x 1 and 2 processes x 4 all take the same step.
"""

import contextlib
import json
import math
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from distill.budget import record_training
from distill.config import RunConfig, dump_config
from distill.data.build import build_rows, build_task_examples
from distill.data.rationale import TASK_NAMES, task_weights
from distill.data.rows import IGNORE_INDEX, collate, global_batch_indices, micro_batches, tokenize_rows
from distill.errors import DistillError
from distill.loss.terms import (
    combine,
    fused_sparse_term_sums,
    fused_term_sums,
    head_matches_logits,
    sparse_term_sums,
    term_sums,
)
from distill.models.build import build_models, build_teacher_cache, output_size
from distill.models.loading import count_parameters
from distill.paths import atomic_write_json, atomic_write_text
from distill.progress import Progress
from distill.training.alignment import AlignmentProbe, Probe
from distill.training.checkpoint import load_training_state, save_training_state
from distill.training.features import (
    build_projectors,
    export_projectors,
    feature_term_sum,
    kept_layers,
    layer_pairs,
    num_layers,
)
from distill.training.on_policy import check_prompts, is_on_policy_step, sample_examples


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup (the first step already learns), then cosine decay to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    return ckpts[-1] if ckpts else None


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Every process checks (a check on one alone would leave the others waiting)."""
    if not resume and latest_checkpoint(run_dir) is not None:
        raise DistillError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or pick another out_dir")


def save_checkpoint(acc: Accelerator, modules: list, optimizer, scheduler, run_dir: Path, step: int, keep: int) -> Path:
    """Weights, optimizer, scheduler and RNG states (`distill.training.checkpoint`: safetensors and
    JSON, no pickle) into a temp folder, renamed into place once complete, so an interrupted
    save leaves no half checkpoint."""
    root = run_dir / "checkpoints"
    final, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    save_training_state(acc, modules, optimizer, scheduler, tmp)
    acc.wait_for_everyone()
    if acc.is_main_process:
        atomic_write_json(tmp / "state.json", {"step": step})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old)
    acc.wait_for_everyone()
    return final


def trim_metrics(path: Path, last_step: int) -> None:
    """On resume, drop records (metrics, alignment) of steps past the checkpoint: they are
    about to be redone."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
        atomic_write_text(path, "".join(line + "\n" for line in keep))


def export_student(acc: Accelerator, model, tokenizer, run_dir: Path) -> None:
    """save_pretrained into run_dir/student, so plain transformers reloads it."""
    state = acc.get_state_dict(model)
    if acc.is_main_process:
        tmp, final = run_dir / ".tmp-student", run_dir / "student"
        shutil.rmtree(tmp, ignore_errors=True)
        acc.unwrap_model(model).save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    acc.wait_for_everyone()


def teacher_outputs(teacher, batch, use_fused: bool, cfg: RunConfig):
    """The teacher's forward on a micro-batch (no grad): hidden states where the fused loss or
    the feature term needs them; logits unless only hidden states are needed."""
    if teacher is None:
        return None
    states = use_fused or cfg.features.weight > 0
    only_states = use_fused or cfg.objective.alpha == 0
    with torch.no_grad():
        return teacher(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=states,
            **({"logits_to_keep": 1} if only_states else {}),  # skips the (B, T, V) logits
        )


def timer(acc: Accelerator, since: float) -> float:
    """Seconds since `since`, after the device has finished its queued work."""
    if acc.device.type == "cuda":
        torch.cuda.synchronize(acc.device)
    return time.perf_counter() - since


def micro_batch_objective(
    student, t_out, batch, use_fused: bool, s_head, t_head, vocab: int, cfg: RunConfig, weights, projectors=None, pairs=None
):
    """(weighted loss sum, {term: sum}) of one micro-batch; sums over its valid tokens.
    t_out: `teacher_outputs` of the batch (None without a live teacher); weights: the
    (task CE, KD) term weights."""
    obj = cfg.objective
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    params = obj.divergence_params()
    cached = (batch["teacher_ids"], batch["teacher_logprobs"], batch["teacher_rest"]) if "teacher_ids" in batch else None
    states = use_fused or projectors is not None  # hidden states are needed
    # logits_to_keep=1: the model skips its own (B, T, V) logits on the fused path.
    s_out = student(**inputs, output_hidden_states=states, **({"logits_to_keep": 1} if use_fused else {}))
    if use_fused and cached is not None:  # a cached top-k teacher, fused with the student's lm_head
        loss, terms = fused_sparse_term_sums(
            s_out.hidden_states[-1], s_head, batch["labels"], *cached, vocab, *weights, obj.temperature,
            obj.divergence, params, obj.chunk_size,
        )
    elif use_fused:
        loss, terms = fused_term_sums(
            s_out.hidden_states[-1], s_head, t_out.hidden_states[-1], t_head, batch["labels"], vocab,
            *weights, obj.temperature, obj.divergence, params, obj.chunk_size,
        )
    elif cached is not None:  # a cached top-k teacher: no teacher model at all
        terms = sparse_term_sums(s_out.logits, batch["labels"], *cached, vocab, obj.temperature, obj.divergence, params)
        loss = combine(terms, *weights)
    else:
        teacher_logits = t_out.logits if t_out is not None and obj.alpha > 0 else None  # (B, T, V)
        terms = term_sums(s_out.logits, batch["labels"], teacher_logits, vocab, obj.temperature, obj.divergence, params)
        loss = combine(terms, *weights)
    if projectors is not None:
        mask = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
        mask[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX  # the positions the other terms count
        if cfg.features.skip_first_token:
            mask[:, 0] = False
        feature = feature_term_sum(projectors, pairs, cfg.features.loss, s_out.hidden_states, t_out.hidden_states, mask)
        loss = loss + cfg.features.weight * feature  # (1 - alpha) CE + alpha T^2 D + beta * feature
        terms["feature"] = feature
    return loss, terms


def build_probe(cfg: RunConfig, pairs, teacher, tokenizer, run_dir: Path, write: bool):
    """The run's `AlignmentProbe`, or None (no teacher model, no held-out rows, or turned off)."""
    f = cfg.features
    if teacher is None or f.probe_examples == 0:
        return None
    rows = build_rows(cfg.data, "test")[: f.probe_examples]
    if not rows:
        return None
    examples = tokenize_rows(rows, tokenizer, cfg.data.max_length, source="held-out probe")
    probe = Probe(examples, tokenizer.pad_token_id, f.probe_tokens, f.skip_first_token)
    return AlignmentProbe(probe, pairs, teacher, run_dir, write)


def train(cfg: RunConfig, resume: bool = False, show_progress: bool = True) -> dict:
    """Run (or resume) the run described by `cfg` in cfg.out_dir. Returns the train summary."""
    run_dir = Path(cfg.out_dir)
    # accelerate only sets up multi-process CPU (gloo) when told cpu=True.
    cpu = cfg.train.device == "cpu" or not torch.cuda.is_available()
    acc = Accelerator(cpu=cpu, mixed_precision="bf16" if cfg.train.precision == "bf16" else "no")
    if cfg.features.weight > 0 and acc.distributed_type == DistributedType.FSDP:
        raise DistillError("features.weight > 0 runs on one process or DDP; FSDP does not shard the projectors yet")
    if cfg.on_policy.lmbda > 0 and acc.distributed_type == DistributedType.FSDP:
        raise DistillError("on_policy.lmbda > 0 runs on one process or DDP; rollouts from FSDP shards are not built yet")
    set_seed(cfg.train.seed)
    student, teacher, tokenizer, vocab = build_models(cfg)
    pairs = None  # the layer pairs of the feature term and of the CKA probe; a bad map stops here
    if teacher is not None:
        kept = kept_layers(cfg.student.name) if cfg.features.layers == "kept" else None
        pairs = layer_pairs(cfg.features, num_layers(student), num_layers(teacher), kept)
    torch.manual_seed(cfg.train.seed + 2)  # projector init, apart from the models' seeds
    projectors = build_projectors(cfg.features, pairs, student, teacher)
    task_examples = build_task_examples(cfg, tokenizer)  # one list per task, aligned by row
    examples = task_examples[0]  # the label task: what rollouts, the cache and the probe use
    task_w = task_weights(cfg.rationale)
    if cfg.on_policy.lmbda > 0:
        check_prompts(examples, cfg.on_policy.max_new_tokens, cfg.data.max_length)
    cache = build_teacher_cache(cfg, tokenizer, examples, output_size(student))
    check_run_dir(run_dir, resume)
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    acc.wait_for_everyone()

    t = cfg.train
    trained = [*student.parameters(), *(projectors.parameters() if projectors is not None else [])]
    optimizer = torch.optim.AdamW(
        trained, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay, fused=True if t.fused_optimizer else None
    )
    # The scheduler is stepped by hand once per optimizer step (accelerate's prepared
    # scheduler would step once per process); checkpoints carry its counters as JSON.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.warmup_steps, t.steps, t.min_lr_ratio)
    )
    if projectors is not None:
        student, projectors, optimizer = acc.prepare(student, projectors, optimizer)
    else:
        student, optimizer = acc.prepare(student, optimizer)
    synced = [student] + ([projectors] if projectors is not None else [])
    if teacher is not None:
        teacher.to(acc.device)

    start, last_ckpt = 0, None
    if resume:
        last_ckpt = latest_checkpoint(run_dir)
        if last_ckpt is None:
            raise DistillError(f"{run_dir}: no checkpoint to resume from")
        load_training_state(acc, synced, optimizer, scheduler, last_ckpt)
        start = json.loads((last_ckpt / "state.json").read_text())["step"]
        if acc.is_main_process:
            trim_metrics(run_dir / "metrics.jsonl", start)
            trim_metrics(run_dir / "alignment.jsonl", start)

    world, rank = acc.num_processes, acc.process_index
    global_batch = t.micro_batch_size * t.grad_accum * world
    n_params = count_parameters(acc.unwrap_model(student))
    use_fused = (teacher is not None or cache is not None) and cfg.objective.alpha > 0 and cfg.objective.fused is not False
    if use_fused:
        sample = collate(examples[:2], tokenizer.pad_token_id)
        sample = {k: v.to(acc.device) for k, v in sample.items() if k != "labels"}
        models = [acc.unwrap_model(student)] + ([teacher] if teacher is not None else [])
        use_fused = all(head_matches_logits(m, **sample) for m in models)
        if not use_fused and cfg.objective.fused:
            raise DistillError("objective.fused=true, but a model's logits are not a plain lm_head of its hidden states")
    probe = build_probe(cfg, pairs, teacher, tokenizer, run_dir, acc.is_main_process)
    alignment = None
    if probe is not None and (start == 0 or not (run_dir / "latents" / f"step-{start:06d}.safetensors").exists()):
        alignment = probe(start, student, projectors, snapshot=True)  # also a snapshot a crash cut short
    s_head = acc.unwrap_model(student).get_output_embeddings()
    t_head = teacher.get_output_embeddings() if teacher is not None else None
    student.train()
    progress = Progress(t.steps, start, enabled=show_progress and acc.is_main_process)
    tokens_seen, t_start = 0, time.perf_counter()
    # Budget: the work since the last record goes into budget.json at each checkpoint (the
    # last step always is one), so a crash loses only steps that a resume redoes.
    t_params = count_parameters(teacher) if teacher is not None else None
    unrecorded = {"tokens": 0, "teacher_s": 0.0, "since": time.perf_counter()}

    def record_budget() -> None:
        if acc.is_main_process and unrecorded["tokens"]:
            seconds = time.perf_counter() - unrecorded["since"]
            record_training(run_dir, cfg, n_params, t_params, unrecorded["tokens"], seconds, unrecorded["teacher_s"])
        unrecorded.update(tokens=0, teacher_s=0.0, since=time.perf_counter())

    for step in range(start, t.steps):
        t0 = time.perf_counter()
        indices = global_batch_indices(step, len(examples), global_batch, t.seed)
        mbs = micro_batches(indices, rank, world, t.micro_batch_size)
        on_policy = is_on_policy_step(t.seed, step, cfg.on_policy.lmbda)
        record = {"on_policy": on_policy} if cfg.on_policy.lmbda > 0 else {}
        source = examples
        if on_policy:  # one rollout for all of this process's micro-batches, current weights
            mine = [i for mb in mbs for i in mb]
            with acc.autocast():
                sampled, done = sample_examples(
                    acc.unwrap_model(student), examples, mine, cfg.on_policy, tokenizer.eos_token_id,
                    tokenizer.pad_token_id, t.seed, step,
                )
            source = dict(zip(mine, sampled))
            generated = acc.reduce(torch.tensor([done.generated_tokens, sum(done.ended)], device=acc.device), "sum")
            record.update(
                policy_step=step, rollout_s=timer(acc, t0), generated_tokens=generated[0].item(),
                eos_rate=generated[1].item() / global_batch,
            )
        batches = []  # (task, batch)
        for mb in mbs:
            for task, exs in enumerate(task_examples):
                batch = collate([(source if task == 0 else exs)[i] for i in mb], tokenizer.pad_token_id)
                if cache is not None:
                    batch = cache.attach(batch, mb)
                batches.append((task, {k: v.to(acc.device) for k, v in batch.items()}))
        # On student samples the task CE is left out: it would teach the student its own samples.
        weights = (0.0, cfg.objective.term_weights()[1]) if on_policy else cfg.objective.term_weights()
        teacher_s = 0.0
        # Each task's terms are normalised by that task's global count of valid tokens.
        local_valid = torch.zeros(len(task_w), dtype=torch.float64, device=acc.device)  # (tasks,)
        for task, b in batches:
            local_valid[task] += (b["labels"][:, 1:] != IGNORE_INDEX).sum()
        n_task = acc.reduce(local_valid, "sum").tolist()
        n_valid = sum(n_task)
        sums: dict[str, torch.Tensor] = {}
        for i, (task, batch) in enumerate(batches):
            last = i == len(batches) - 1
            with contextlib.ExitStack() as stack:
                for model in synced if not last else []:
                    stack.enter_context(acc.no_sync(model))
                with acc.autocast():
                    t1 = time.perf_counter()
                    t_out = teacher_outputs(teacher, batch, use_fused, cfg)
                    teacher_s += timer(acc, t1)
                    loss, terms = micro_batch_objective(
                        student, t_out, batch, use_fused, s_head, t_head, vocab, cfg, weights, projectors, pairs
                    )
                if on_policy:
                    terms.pop("task_ce")  # the student's likelihood of its own samples: not a task loss
                # DDP averages gradients over processes; scaling by world size turns that
                # average back into the global sum / global valid-token count.
                acc.backward(loss * world * task_w[task] / max(n_task[task], 1.0))
            for k, v in {**terms, "loss": loss}.items():
                name = TASK_NAMES[task] + k
                sums[name] = sums.get(name, 0.0) + v.detach().double()
        names = sorted(sums)
        totals = acc.reduce(torch.stack([sums[k] for k in names]), "sum")
        for name, total in zip(names, totals.tolist()):
            task = 1 if name.startswith(TASK_NAMES[1]) else 0
            record[name] = total / max(n_task[task], 1.0)
        if len(task_w) > 1:  # L_label + lambda * L_rationale
            record["label_loss"] = record["loss"]
            record["loss"] = record["label_loss"] + task_w[1] * record.pop("rationale_loss")
        if not math.isfinite(record["loss"]):
            optimizer.zero_grad(set_to_none=True)
            where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was saved yet"
            raise DistillError(f"loss became {record['loss']} at step {step + 1}; stopped before updating ({where})")
        grad_norm = None
        if t.max_grad_norm is not None:
            grad_norm = acc.clip_grad_norm_([p for m in synced for p in m.parameters()], t.max_grad_norm).item()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        step_tokens = acc.reduce(
            torch.as_tensor(sum(b["attention_mask"].sum() for _, b in batches), device=acc.device), "sum"
        ).item()
        tokens_seen += step_tokens
        unrecorded["tokens"] += step_tokens
        unrecorded["teacher_s"] += teacher_s
        dt = time.perf_counter() - t0
        record.update(step=step + 1, lr=lr, grad_norm=grad_norm, valid_tokens=n_valid, tokens_per_s=step_tokens / dt)
        record.update(step_s=dt, **({"teacher_s": teacher_s} if teacher is not None else {}))
        if acc.is_main_process:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        progress.update(step + 1, record["loss"], record["tokens_per_s"])
        done = step + 1
        checkpoint = (t.checkpoint_every and done % t.checkpoint_every == 0) or done == t.steps
        if checkpoint:
            last_ckpt = save_checkpoint(acc, synced, optimizer, scheduler, run_dir, done, t.keep_checkpoints)
            record_budget()
        if probe is not None and (checkpoint or (cfg.features.probe_every and done % cfg.features.probe_every == 0)):
            alignment = probe(done, student, projectors, snapshot=bool(checkpoint))
    progress.close()
    wall = time.perf_counter() - t_start

    export_student(acc, student, tokenizer, run_dir)
    if projectors is not None:
        state = acc.get_state_dict(projectors)
        if acc.is_main_process:
            export_projectors(acc.unwrap_model(projectors), state, run_dir)
    summary = {
        "steps": t.steps,
        "resumed_from": start,
        "params": n_params,
        "tokens": tokens_seen,
        "wall_s": wall,
        "tokens_per_s": tokens_seen / wall if wall > 0 else 0.0,
        "processes": world,
        "fused_loss": use_fused,
        "teacher": "cache" if cache is not None else "live" if teacher is not None else None,
        "feature_pairs": len(acc.unwrap_model(projectors).pairs) if projectors is not None else 0,
        "projector_params": count_parameters(acc.unwrap_model(projectors)) if projectors is not None else 0,
    }
    if alignment is not None:
        summary["alignment"] = {k: v for k, v in alignment.items() if k != "pairs"}
    if acc.is_main_process:
        atomic_write_json(run_dir / "train_summary.json", summary)
    return summary

