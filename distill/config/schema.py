"""The run config's schema: one pydantic section per concern, one docstring per field.

The sections of the run itself are here, with the cross-field rules in their validators; the
base class is in `base.py`, model sources in `model.py`, evaluation and gates in
`evaluation.py`, the sections of the methods beyond logit KD (feature alignment, on-policy
sampling, rationales) in `methods.py`. Reading YAML, dotted overrides and the one-line error messages are in
`distill.config.files`.
"""

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from distill.config.base import Section
from distill.config.evaluation import EvalConfig, GatesConfig
from distill.config.methods import FeatureConfig, OnPolicyConfig, RationaleConfig
from distill.config.model import ModelConfig
from distill.config.quant import QuantConfig
from distill.data.sources import ROW_FIELDS, is_hf, local_path


class DataConfig(Section):
    source: str = "builtin:chain"
    """'builtin:chain' (the built-in task), a JSONL file of {"prompt", "completion"} rows
    ({"text"} rows: a completion with no prompt; {"messages"} rows: chat, rendered with the
    student's chat template, the loss on the assistant turns), or 'hf:PATH', read with Hugging Face
    datasets: a save_to_disk folder, a parquet / arrow / JSON / CSV file, a folder of such
    files, or a hub dataset name (a .parquet or .arrow path needs no 'hf:')."""
    eval_source: str | None = None
    """For JSONL or hf: data: the held-out rows, a JSONL file or an hf: source (the built-in task
    has its own test split). Unset with {"text"} rows: 5% of the rows are held out by a hash of
    their text (at least one)."""
    split: str | None = None
    """The split of an hf: data.source that training reads (a DatasetDict folder, a folder of
    data files, a hub dataset); null: 'train'. A single file or Dataset folder has just one."""
    eval_split: str | None = None
    """The split of an hf: data.eval_source; null: 'test' (a single file or Dataset folder has
    just one, which is read)."""
    columns: dict[str, str] = Field(default_factory=dict)
    """hf: sources: {row field: dataset column} for the fields prompt, completion, text, answer,
    rationale (and messages), e.g. {prompt: question, completion: answer}. An unmapped field is
    read from the column of its own name, unless that column is mapped to another field."""
    streaming: bool = False
    """hf: sources: read only the first n_train training rows (n_test held-out rows) in the
    dataset's own order, without loading the rest (a hub dataset: without downloading it). The
    run trains on exactly those rows, in the usual (seed, step) order."""
    subset: str | None = None
    """The configuration (subset) of a hub dataset, e.g. 'main' of openai/gsm8k."""
    seed: int = 0
    """Seed of the built-in task's problems and splits."""
    n_train: int = Field(20000, ge=1)
    """Training problems generated for the built-in task; with streaming, the rows read from an
    hf: source (JSONL files and hf: sources without streaming: all their rows)."""
    n_test: int = Field(500, ge=0)
    """Held-out problems (or held-out rows, at most) for evaluation."""
    min_ops: int = Field(3, ge=1)
    """Fewest operations in a built-in problem."""
    max_ops: int = Field(6, ge=1, le=1000)
    """Most operations in a built-in problem (at least min_ops)."""
    max_length: int = Field(512, ge=2)
    """Longest tokenized row, and the block length of packing; a longer row is an error
    naming the row (unless truncate)."""
    truncate: bool = False
    """Cut a row longer than max_length to its first max_length tokens (it then has no EOS)
    instead of stopping with an error naming the row."""
    packing: bool | None = None
    """Pack whole tokenized rows (each ending in EOS) into blocks of up to max_length tokens,
    with attention and positions restarting at every row, so no token sees another row and
    every target is counted once, as in the row alone. null: on for {"text"} rows (no
    prompt: pre-training-style data), off for prompt/completion rows and built-in tasks, and
    off with on_policy or rationale.mode=multitask, which need whole rows."""
    split_rows: bool = False
    """With packing: fill every block to exactly max_length, in the rows' order, a row that
    does not fit continuing in the next block as a document of its own (positions restart
    and attention stays inside each piece; the piece's first token is not a target, one
    target lost per cut). No padding, and no row is too long (max_length and truncate
    then bound nothing). Off: rows stay whole, blocks filled best-fit."""

    @property
    def cuts_long_rows(self) -> bool:
        """Whether a held-out row over max_length is cut rather than refused: data.truncate,
        or data.split_rows (which refuses no training row, so no held-out row either)."""
        return self.truncate or self.split_rows

    @field_validator("eval_source")
    @classmethod
    def _eval_source_exists(cls, value: str | None) -> str | None:
        """Checked now: evaluation reads it only after the whole training run."""
        if value is not None and is_hf(value):
            path = local_path(value)  # None: a hub name, which only reading it can check
            if path is not None and not path.exists():
                raise ValueError(f"not found: {value!r} (the held-out rows evaluation reads after training)")
        elif value is not None and not value.startswith("builtin:") and not Path(value).is_file():
            raise ValueError(f"file not found: {value!r} (the held-out rows evaluation reads after training)")
        return value

    @field_validator("columns")
    @classmethod
    def _row_fields(cls, value: dict[str, str]) -> dict[str, str]:
        for field, column in value.items():
            if field not in ROW_FIELDS:
                raise ValueError(f"'{field}' is not a row field (fields: {', '.join(ROW_FIELDS)})")
            if not column:
                raise ValueError(f"columns.{field} is empty; give a column name")
        return value

    @model_validator(mode="after")
    def _hf_keys(self):
        """split, eval_split, columns, streaming and subset read hf: sources only."""
        used = [k for k in ("split", "eval_split", "columns", "streaming", "subset") if getattr(self, k)]
        if used and not any(s is not None and is_hf(s) for s in (self.source, self.eval_source)):
            hint = "" if self.source.startswith("builtin:") else f" (read it through datasets as 'hf:{self.source}')"
            raise ValueError(f"{', '.join('data.' + k for k in used)} apply to Hugging Face sources; data.source is {self.source!r}{hint}")
        return self

    @model_validator(mode="after")
    def _ops_range(self):
        if self.min_ops > self.max_ops:
            raise ValueError(f"min_ops={self.min_ops} is above max_ops={self.max_ops}; give min_ops <= max_ops")
        return self


class ObjectiveConfig(Section):
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    """Weight of the distillation term: (1 - alpha) * task CE + alpha * T^2 * D (T^2 only with
    t_squared). 0 = no logit distillation (labels only, and no teacher loaded, unless
    features.weight > 0)."""
    temperature: float = Field(2.0, gt=0.0)
    """Loss temperature T: both models' logits are divided by T before the divergence, which
    softens the distributions and exposes the teacher's ranking of wrong tokens. It shapes
    the loss only; it is not a sampling temperature (evaluation decodes greedily)."""
    t_squared: bool = True
    """Multiply the KD term by T^2 (Hinton 2015): the soft-target gradients shrink like 1/T^2,
    so this keeps the KD term's scale comparable across temperatures and to the task CE.
    false: the KD term is alpha * D, unscaled."""
    divergence: str = "forward_kl"
    """D, a name in the divergence registry (`distill.loss.registry`): forward_kl (mean-seeking),
    reverse_kl (mode-seeking), jsd (generalized JSD), skew_forward_kl, skew_reverse_kl, tvd, or
    one registered since."""
    jsd_beta: float = Field(0.5, ge=0.0, le=1.0)
    """Mixture weight of the generalized JSD: 0 is forward KL, 1 is reverse KL."""
    skew_alpha: float = Field(0.1, ge=0.0, le=1.0)
    """Skew of the skew KLs (DistiLLM): KL(p || a p + (1 - a) q); 0 is the plain KL."""

    fused: bool | None = None
    """Fused chunked lm_head + divergence (no tokens x vocab logits). None: use it whenever
    both models' logits are a plain lm_head of their last hidden state; true: require it."""
    chunk_size: int | None = Field(None, ge=1)
    """Tokens per chunk of the fused path; null: about 2**25 logits per chunk (V=128k: 261)."""
    cross_tokenizer: Literal["bucket", "uld"] | None = None
    """A teacher of another tokenizer: each student row is retokenized for the teacher, the
    two tokenizations aligned by byte offsets, and the KD term taken where both predict from
    the same text. bucket: the divergence over the token strings both vocabularies hold plus
    one leftover bucket per side; uld: that plus the sorted-probability L1 (ULD) between the
    leftovers. null: the tokenizers must match (a mismatch is an error)."""
    uld_top_k: int = Field(64, ge=1)
    """With cross_tokenizer=uld: how many of each side's largest leftover probabilities ULD compares."""

    def term_weights(self) -> tuple[float, float]:
        """(task CE weight, KD weight): (1 - alpha, alpha * T^2), or alpha without t_squared."""
        return 1.0 - self.alpha, self.alpha * (self.temperature**2 if self.t_squared else 1.0)

    @field_validator("divergence")
    @classmethod
    def _registered_divergence(cls, value: str) -> str:
        """A registered name (read at validation time: one registered after import counts)."""
        from distill.loss.registry import DIVERGENCES, nearest_divergence

        spec = DIVERGENCES.get(value)
        if spec is None:
            names = [repr(n) for n in DIVERGENCES]
            choices = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else "".join(names)
            near = nearest_divergence(value)
            raise ValueError(f"expected {choices}, got {value!r}" + (f" (did you mean {near!r}?)" if near else ""))
        for p in spec.params:
            if p.config_field not in cls.model_fields:
                raise ValueError(f"divergence {value!r} takes {p.name} from objective.{p.config_field}, which does not exist")
        return value

    def divergence_params(self) -> dict[str, float]:
        """The divergence's parameters from their registered config fields (jsd: beta <- jsd_beta;
        skew KLs: alpha <- skew_alpha; none for the others)."""
        from distill.loss.registry import get_divergence

        return {p.name: getattr(self, p.config_field) for p in get_divergence(self.divergence).params}


class TrainConfig(Section):
    steps: int = Field(300, ge=1)
    """Optimizer steps."""
    micro_batch_size: int = Field(32, ge=1)
    """Examples per forward pass on each process."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step on each process."""
    lr: float = Field(3e-3, gt=0.0)
    """Peak learning rate of AdamW."""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """The cosine schedule ends at lr * min_lr_ratio."""
    warmup_steps: int = Field(20, ge=0)
    """Linear warmup steps before the cosine decay."""
    weight_decay: float = Field(0.01, ge=0.0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas, each in [0, 1)."""
    fused_optimizer: bool = False
    """AdamW as one fused kernel over all parameters (CPU and CUDA) instead of torch's
    default multi-tensor one: about 4x faster optimizer steps on a 64M-parameter student on
    CPU. Results differ from the default in the last bits, which on unstable runs (the
    demo's KD student) can decide the outcome."""
    freeze_embeddings: bool = False
    """Keep the student's input embeddings and its lm_head (one matrix when tied) as they came,
    untrained: with a student cut from its teacher they are the teacher's own, and the rest of
    the student learns to feed them. No gradient and no optimizer state for them, and the
    fused loss skips the lm_head's weight gradient (one of its three vocabulary-sized matmuls)."""
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    """Gradient clipping norm (> 0); null turns clipping off."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Autocast precision of the forward passes (weights and optimizer stay fp32). bf16 trades
    one invariance: another batch layout (1 x 8 vs 8 x 1 micro-batches, 2 processes vs 1)
    rounds differently, so those runs agree within bf16 rounding, not to 1e-5; a resumed run
    still equals an uninterrupted one."""
    sharding: Literal["none", "fsdp"] = "none"
    """How several processes hold the student. none: each holds all of it (DDP: gradients
    all-reduced). fsdp: FSDP2 (torch's fully_shard): each decoder layer and the rest of the
    student, and the feature projectors, split over the processes, so each holds 1/N of the
    weights, gradients and optimizer state; every term, on-policy sampling and resume work
    as with DDP (docs/guide/scale.md). Ignored with one process."""
    teacher_sharding: Literal["replicate", "shard"] = "replicate"
    """With sharding: fsdp, the frozen teacher. replicate: a whole copy in every process (no
    communication in its forward). shard: its decoder layers split over the processes like the
    student's, gathered layer by layer in each forward; its embeddings and lm_head stay
    whole in every process. The memory arithmetic is in docs/guide/scale.md."""
    seed: int = Field(0, ge=0, le=2**32 - 1)
    """Seed of initialisation, data order and sampling (0 to 2**32 - 1)."""
    device: Literal["auto", "cpu"] = "auto"
    """'auto': the accelerator when there is one (CUDA), else CPU; 'cpu' forces CPU."""
    checkpoint_every: int = Field(0, ge=0)
    """Save a checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many recent checkpoints to keep."""
    report_to: list[Literal["tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab"]] = Field(default_factory=list)
    """Experiment trackers (through Accelerate's) that get every numeric metrics.jsonl field at
    its step, and the run config; metrics.jsonl stays the run's record. Each needs its package
    (`pip install tensorboard`, ...); files of local trackers go under RUN/trackers/."""
    tracker_project: str = Field("distill", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    """The trackers' project name (wandb / trackio project, TensorBoard folder RUN/trackers/NAME):
    letters, digits, '.', '_', '-'. The run's name in them is its out_dir folder's name."""

    @field_validator("report_to")
    @classmethod
    def _each_tracker_once(cls, value: list[str]) -> list[str]:
        twice = sorted({name for name in value if value.count(name) > 1})
        if twice:
            raise ValueError(f"names {', '.join(twice)} more than once")
        return value

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"each beta must be in [0, 1), got {list(value)}")
        return value


class RunConfig(Section):
    student: ModelConfig
    """The model being trained."""
    teacher: ModelConfig | None = None
    """The model imitated; required when objective.alpha > 0."""
    data: DataConfig = DataConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    train: TrainConfig = TrainConfig()
    features: FeatureConfig = FeatureConfig()
    """Hidden-state alignment (feature term, projectors) and the CKA probe."""
    eval: EvalConfig = EvalConfig()
    on_policy: OnPolicyConfig = OnPolicyConfig()
    """Student-sampled completions scored by the teacher (GKD); off unless lmbda > 0."""
    rationale: RationaleConfig = RationaleConfig()
    """Rationale then answer as one target (default), the answer alone, or step-by-step
    multitask training."""
    teacher_cache: str | None = None
    """A directory written by `distill cache` for this data and temperature: the KD term then
    uses the cached top-k teacher distribution (sparse divergence) and no teacher model is
    loaded. A cache of another tokenizer, dataset or temperature is refused."""
    gates: GatesConfig = GatesConfig()
    """Release gates on the evaluation's metrics (`distill eval --gates`)."""
    quant: QuantConfig = QuantConfig()
    """Quantization-aware distillation and the quantized export (off unless quant.scheme)."""
    out_dir: str = Field("runs/run", min_length=1)
    """The run directory."""

    @model_validator(mode="after")
    def _teacher_needed(self):
        if self.objective.alpha > 0 and self.teacher is None and self.teacher_cache is None:
            raise ValueError("objective.alpha > 0 distils from a teacher, but neither 'teacher' nor 'teacher_cache' is set")
        if self.features.weight > 0 and self.teacher is None:
            raise ValueError("features.weight > 0 aligns hidden states with a teacher, but 'teacher' is not set")
        if self.features.weight > 0 and self.teacher_cache is not None:
            raise ValueError("features.weight > 0 needs the live teacher's hidden states; a teacher_cache holds logits only")
        if self.teacher_cache is not None and self.rationale.mode != "completion":
            raise ValueError("a teacher_cache covers the rows' completions; rationale.mode must be 'completion' with it")
        if self.objective.cross_tokenizer is not None:
            if self.objective.fused:
                raise ValueError("objective.fused=true: the fused path needs one vocabulary; objective.cross_tokenizer has two")
            if self.data.packing:
                raise ValueError("data.packing=true packs rows into blocks, but objective.cross_tokenizer retokenizes whole rows")
            if self.features.weight > 0:
                raise ValueError("features.weight > 0 pairs positions of one tokenization; objective.cross_tokenizer has two")
            if self.teacher is None:
                raise ValueError("objective.cross_tokenizer aligns with the teacher's tokenizer; set 'teacher' (with a teacher_cache too)")
            self.data.packing = False
        if self.on_policy.lmbda > 0 or self.rationale.mode == "multitask":
            if self.data.packing:
                why = "on_policy.lmbda > 0 samples completions of whole prompts"
                if self.on_policy.lmbda == 0:
                    why = "rationale.mode=multitask trains two tasks aligned row by row"
                raise ValueError(f"data.packing=true packs rows into blocks, but {why}; set data.packing=false")
            if self.data.packing is None:
                self.data.packing = False  # null resolves to whole rows here
        if self.data.split_rows and self.data.packing is False:
            raise ValueError(
                "data.split_rows=true cuts rows across packed blocks, but data.packing is off "
                "(false, or turned off by on_policy, rationale multitask or cross_tokenizer)"
            )
        if self.on_policy.lmbda > 0:
            if self.teacher is None or self.objective.alpha == 0:
                raise ValueError("on_policy.lmbda > 0 needs a live 'teacher' and objective.alpha > 0 to score the samples")
            if self.teacher_cache is not None:
                raise ValueError("on_policy.lmbda > 0 scores new student samples; a teacher_cache only covers the dataset")
            if self.rationale.mode != "completion":
                raise ValueError("on_policy.lmbda > 0 samples whole completions; use rationale.mode=completion")
            if "divergence" not in self.objective.model_fields_set:
                self.objective.divergence = "jsd"  # GKD's default
        return self
