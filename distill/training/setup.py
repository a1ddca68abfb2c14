"""Setup: a run config -> everything the loop needs (`Run`), built once.

The order of construction is fixed, and part of the run's reproducibility: seeds are set
before the models are built, the projectors draw from their own seed stream, and a resume
restores every state after the optimizer exists.
"""

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, set_seed

from distill import seeds
from distill.config import RunConfig
from distill.data.build import build_rows, build_task_examples
from distill.data.packing import check_isolation
from distill.data.rationale import task_weights
from distill.data.rows import tokenize_rows
from distill.errors import DistillError
from distill.models.build import build_models, build_teacher_cache, build_tokenizer, output_size
from distill.models.loading import count_parameters
from distill.models.quantize import Scheme, prepare_qat
from distill.training.alignment import AlignmentProbe, Probe
from distill.training.batch_sources import BatchSource, build_batch_source
from distill.training.cross_teacher import Retokenizer
from distill.training.features import build_projectors, kept_layers, layer_pairs, num_layers
from distill.training.host_memory import keep_freed_memory
from distill.training.objective import LossTerm, build_extra_terms
from distill.training.on_policy import check_prompts
from distill.training.resume import open_run_dir, resume_from
from distill.training.sharding import shard, wanted
from distill.training.teachers import Teacher, build_teacher_source, use_fused_path
from distill.training.trackers import accelerator_settings


@dataclass
class Run:
    """A run in progress: its settings, models, plug-ins and where it starts."""

    cfg: RunConfig
    acc: Accelerator
    run_dir: Path
    student: torch.nn.Module  # prepared (DDP-wrapped or FSDP-sharded where launched so)
    tokenizer: object
    teacher: Teacher
    source: BatchSource
    terms: list[LossTerm]
    projectors: torch.nn.Module | None  # prepared, or None without a feature term
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    n_examples: int
    task_weights: list[float]
    probe: AlignmentProbe | None
    start: int  # optimizer steps already done (a resume's checkpoint)
    last_checkpoint: Path | None
    n_params: int
    teacher_params: int | None

    @property
    def trained(self) -> list[torch.nn.Module]:
        """The modules the optimizer updates (and checkpoints carry), in checkpoint order."""
        return [self.student] + ([self.projectors] if self.projectors is not None else [])


def timer(acc: Accelerator):
    """seconds(since): seconds since `since`, after the device has finished its queued work."""

    def seconds(since: float) -> float:
        if acc.device.type == "cuda":
            torch.cuda.synchronize(acc.device)
        return time.perf_counter() - since

    return seconds


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup (the first step already learns), then cosine decay to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_accelerator(cfg: RunConfig) -> Accelerator:
    # accelerate only sets up multi-process CPU (gloo) when told cpu=True.
    cpu = cfg.train.device == "cpu" or not torch.cuda.is_available()
    # accelerate keeps one precision per process and refuses another; each run sets its own
    # (the distributed state, PartialState, is kept).
    AcceleratorState._reset_state()
    acc = Accelerator(cpu=cpu, mixed_precision="bf16" if cfg.train.precision == "bf16" else "no", **accelerator_settings(cfg))
    if acc.distributed_type == DistributedType.FSDP:
        raise DistillError(
            "launched with accelerate's FSDP plugin; distill shards by itself: set train.sharding: fsdp and launch "
            "with torchrun or accelerate launch without an FSDP config"
        )
    if wanted(cfg, acc) and cfg.on_policy.lmbda > 0 and cfg.on_policy.sample_dtype != "float32":
        raise DistillError("on_policy.sample_dtype: bfloat16 is not built for train.sharding: fsdp; use float32 there")
    if wanted(cfg, acc) and cfg.on_policy.lmbda > 0 and cfg.on_policy.overlap:
        raise DistillError("on_policy.overlap: true is not built for train.sharding: fsdp (a gathered student per rollout); set it false")
    if wanted(cfg, acc) and cfg.on_policy.lmbda > 0 and cfg.on_policy.compile_decode:
        raise DistillError("on_policy.compile_decode: true is not built for train.sharding: fsdp (a gathered student per rollout); set it false")
    if cfg.on_policy.lmbda > 0 and cfg.on_policy.compile_decode and acc.device.type == "cpu" and not cpp_compiler():
        raise DistillError("on_policy.compile_decode: torch.compile needs a C++ compiler on CPU (no $CXX, g++, clang++ or c++ found); install one or set it false")
    return acc


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend would build its kernels with, if any."""
    return os.environ.get("CXX") or next(filter(None, map(shutil.which, ("g++", "clang++", "c++"))), None)


def freeze_embeddings(model: torch.nn.Module) -> None:
    """Take the input embeddings and the lm_head (tied or not) out of training."""
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            module.requires_grad_(False)


def optimizer_and_schedule(cfg: RunConfig, params: list[torch.nn.Parameter]):
    t = cfg.train
    optimizer = torch.optim.AdamW(
        params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay, fused=True if t.fused_optimizer else None
    )
    # Stepped by hand once per optimizer step (accelerate's prepared scheduler would step
    # once per process); checkpoints carry its counters as JSON.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, t.warmup_steps, t.steps, t.min_lr_ratio))
    return optimizer, scheduler


def build_probe(cfg: RunConfig, pairs, teacher, tokenizer, run_dir: Path, write: bool) -> AlignmentProbe | None:
    """The run's `AlignmentProbe`, or None (no teacher model, another tokenizer, no held-out
    rows, or turned off)."""
    f = cfg.features
    if teacher is None or f.probe_examples == 0 or cfg.objective.cross_tokenizer is not None:
        return None  # the probe feeds both models one tokenization: never a teacher of another vocabulary
    rows = build_rows(cfg.data, "test")[: f.probe_examples]
    if not rows:
        return None
    examples = tokenize_rows(rows, tokenizer, cfg.data.max_length, source="held-out probe", truncate=cfg.data.cuts_long_rows)
    probe = Probe(examples, tokenizer.pad_token_id, f.probe_tokens, f.skip_first_token)
    return AlignmentProbe(probe, pairs, teacher, run_dir, write)


def setup(cfg: RunConfig, resume: bool) -> Run:
    """Build (or restore) the run described by `cfg` in cfg.out_dir."""
    run_dir = Path(cfg.out_dir)
    acc = make_accelerator(cfg)
    fsdp = wanted(cfg, acc)
    if acc.device.type == "cpu" and not fsdp:  # sharded runs keep glibc's release of memory
        keep_freed_memory()  # large tensors freed each step are reused, not faulted in afresh
    set_seed(cfg.train.seed)
    student, teacher_model, tokenizer, vocab = build_models(cfg)
    if cfg.quant.scheme is not None and cfg.quant.aware:  # quantization-aware: fake-quantized linears
        prepare_qat(student, Scheme.from_config(cfg.quant))
    pairs = None  # the layer pairs of the feature term and of the CKA probe; a bad map stops here
    if teacher_model is not None:
        kept = kept_layers(cfg.student.name) if cfg.features.layers == "kept" else None
        pairs = layer_pairs(cfg.features, num_layers(student), num_layers(teacher_model), kept)
    torch.manual_seed(seeds.projector_init(cfg.train.seed))  # apart from the models' seeds
    projectors = build_projectors(cfg.features, pairs, student, teacher_model)
    task_examples = build_task_examples(cfg, tokenizer)  # one list per task, aligned by row
    examples = task_examples[0]  # the label task: what rollouts, the cache and the probe use
    if examples and examples[0].position_ids is not None:  # packed: attention must stay inside each row
        check_isolation({"student": student, **({"teacher": teacher_model} if teacher_model is not None else {})}, examples)
    if cfg.on_policy.lmbda > 0:
        check_prompts(examples, cfg.on_policy.max_new_tokens, cfg.data.max_length)
    cache = build_teacher_cache(cfg, tokenizer, examples, output_size(student))
    open_run_dir(acc, cfg, resume, examples)  # batch vs data, lock, fresh-run / resume checks, config.yaml

    if cfg.train.freeze_embeddings:
        freeze_embeddings(student)
    if fsdp:  # before the optimizer: sharding replaces the parameters
        shard(student, acc.device, acc.num_processes)
        if projectors is not None:
            shard(projectors, acc.device, acc.num_processes, units="whole")
    params = [p for m in (student, projectors) if m is not None for p in m.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_and_schedule(cfg, params)
    if fsdp:
        optimizer = acc.prepare(optimizer)
    elif projectors is not None:
        student, projectors, optimizer = acc.prepare(student, projectors, optimizer)
    else:
        student, optimizer = acc.prepare(student, optimizer)
    trained = [student] + ([projectors] if projectors is not None else [])
    if teacher_model is not None:
        teacher_model.to(acc.device)
        if fsdp and cfg.train.teacher_sharding == "shard":
            shard(teacher_model, acc.device, acc.num_processes)
    start, last = resume_from(acc, run_dir, trained, optimizer, scheduler) if resume else (0, None)

    plain_student = acc.unwrap_model(student)
    fused = use_fused_path(cfg, plain_student, teacher_model, cache, examples, tokenizer.pad_token_id, acc.device)
    probe = build_probe(cfg, pairs, teacher_model, tokenizer, run_dir, acc.is_main_process)
    terms = build_extra_terms(cfg.features, projectors, pairs)
    retok = None
    if cfg.objective.cross_tokenizer is not None and (teacher_model is not None or cache is not None):
        retok = Retokenizer(build_tokenizer(cfg.teacher, "teacher"), tokenizer)
    teacher = build_teacher_source(cfg, vocab, teacher_model, cache, plain_student, fused, bool(terms), retok)
    return Run(
        cfg=cfg, acc=acc, run_dir=run_dir, student=student, tokenizer=tokenizer, teacher=teacher,
        source=build_batch_source(cfg, task_examples, acc, student, tokenizer, timer(acc), len(examples)), terms=terms,
        projectors=projectors, optimizer=optimizer, scheduler=scheduler, n_examples=len(examples),
        task_weights=task_weights(cfg.rationale), probe=probe, start=start, last_checkpoint=last,
        n_params=count_parameters(plain_student),
        teacher_params=count_parameters(teacher_model) if teacher_model is not None else None,
    )
