"""The run config's schema: one pydantic section per concern, one docstring per field.

Cross-field rules live in the sections' validators; reading YAML, dotted overrides and the
one-line error messages are in `distill.config.files`.
"""

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

from distill.errors import ConfigError
from distill.eval.gates import METRICS as GATE_METRICS
from distill.eval.gates import parse_gate

# Sizes of an inline model config that must be positive integers when given.
_POSITIVE_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)


def check_inline_model_config(config: dict[str, Any]) -> None:
    """Build an inline config as its transformers config class (transformers imported only
    here); raises ValueError naming what is wrong."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        # pydantic turns a ValueError (not a TypeError) into the one-line config error
        raise ValueError("an inline model config needs a 'model_type' string (llama, qwen2, ...)")  # noqa: TRY004
    for key in _POSITIVE_SIZES:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    from transformers import AutoConfig

    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    try:
        AutoConfig.for_model(model_type, **kwargs)
    except Exception as e:  # noqa: BLE001 (its validators raise their own exception types)
        text = str(e.__cause__ or e).strip().splitlines()
        if isinstance(e, KeyError) or (text and "Unrecognized model identifier" in text[0]):
            raise ValueError(f"unknown model_type {model_type!r}") from None
        raise ValueError(f"not a valid {model_type} config ({text[0] if text else type(e).__name__})") from None


class Section(BaseModel):
    # No NaN or infinity anywhere: every float of a run config is a finite setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data):
        """No setting holds a NUL character (no file name can; the OS would raise)."""
        if isinstance(data, dict):
            for key, value in data.items():
                if isinstance(value, str) and "\x00" in value:
                    raise ValueError(f"{key} holds a NUL character, which no file name or setting may")
        return data


class ModelConfig(Section):
    """Where a model comes from: exactly one of `name` or `config`."""

    name: str | None = None
    """Hub id, local folder, path to a .gguf file, or 'packaged:smollm2-135m-instruct'."""
    gguf_file: str | None = None
    """A .gguf file inside the folder `name` (transformers' gguf_file argument)."""
    config: dict[str, Any] | None = None
    """An inline transformers config with `model_type` (random init; tests and the demo)."""
    tokenizer: str | None = None
    """Tokenizer source; None means the model's own; 'builtin' is the built-in task's."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Weights dtype when loaded."""

    @model_validator(mode="after")
    def _one_source(self):
        if (self.name is None) == (self.config is None):
            raise ValueError("give exactly one of 'name' (hub id, folder or .gguf) or 'config' (inline)")
        return self

    @field_validator("config")
    @classmethod
    def _valid_inline_config(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """Built as its transformers config class now, so a bad inline config stops here."""
        if value is not None:
            check_inline_model_config(value)
        return value


class DataConfig(Section):
    source: str = "builtin:chain"
    """'builtin:chain' (the built-in task) or a JSONL file of {"prompt", "completion"} rows
    ({"text"} rows: a completion with no prompt)."""
    eval_source: str | None = None
    """For JSONL data: a held-out JSONL file (the built-in task has its own test split). Unset
    with {"text"} rows: 5% of the rows are held out by a hash of their text (at least one)."""
    seed: int = 0
    """Seed of the built-in task's problems and splits."""
    n_train: int = Field(20000, ge=1)
    """Training problems generated for the built-in task."""
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

    @field_validator("eval_source")
    @classmethod
    def _eval_source_exists(cls, value: str | None) -> str | None:
        """Checked now: evaluation reads it only after the whole training run."""
        if value is not None and not value.startswith("builtin:") and not Path(value).is_file():
            raise ValueError(f"file not found: {value!r} (the held-out rows evaluation reads after training)")
        return value

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
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    """Gradient clipping norm (> 0); null turns clipping off."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Autocast precision of the forward passes (weights and optimizer stay fp32)."""
    seed: int = Field(0, ge=0, le=2**32 - 1)
    """Seed of initialisation, data order and sampling (0 to 2**32 - 1)."""
    device: Literal["auto", "cpu"] = "auto"
    """'auto': the accelerator when there is one (CUDA), else CPU; 'cpu' forces CPU."""
    checkpoint_every: int = Field(0, ge=0)
    """Save a checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many recent checkpoints to keep."""

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"each beta must be in [0, 1), got {list(value)}")
        return value


class LayerPair(Section):
    """One aligned pair of hidden states: a student layer, a teacher layer and a weight."""

    student: int | Literal["embeddings"]
    """Student decoder layer, 0-based (its output), or 'embeddings' (the input embeddings)."""
    teacher: int | Literal["embeddings"]
    """Teacher decoder layer, 0-based, or 'embeddings'."""
    weight: float = Field(1.0, ge=0.0)
    """Relative weight of this pair in the feature term."""


class FeatureConfig(Section):
    """Hidden-state alignment: learned projectors from student layers into the teacher's
    space, a feature loss on them, and the CKA probe that measures alignment."""

    weight: float = Field(0.0, ge=0.0)
    """beta: loss = (1 - alpha) CE + alpha T^2 D + beta * feature. 0: no feature term and no
    projectors (the CKA probe still runs on the raw states)."""
    layers: Literal["uniform", "last", "kept"] | list[LayerPair] = "uniform"
    """'uniform': student layer i <-> teacher layer round((i + 1) * L_t / L_s) - 1 (halves
    round up); 'last': the last layers only; 'kept': a layer-drop student's layer i <-> the
    teacher layer it was copied from (its student.json, written by `distill student`); or
    explicit pairs with weights."""
    embeddings: bool = False
    """Also align the input embeddings (a pair added to 'uniform' or 'last')."""
    loss: Literal["mse", "cosine", "ln_mse"] = "mse"
    """Per token: mean squared error over the hidden dimension; 1 - cosine similarity; or the
    MSE of both states after a parameter-free layer norm."""
    projector: Literal["linear", "mlp"] = "linear"
    """Student -> teacher width map: one linear layer, or linear-GELU-linear."""
    projector_bias: bool = False
    """Give the projector layers a bias."""
    mlp_hidden: int | None = Field(None, ge=1)
    """Hidden width of the 'mlp' projector; null: the teacher's width."""
    probe_examples: int = Field(32, ge=0)
    """Held-out examples in the fixed alignment probe (CKA per layer pair, latent snapshots);
    0 turns the probe off. It runs whenever a teacher model is loaded and there is a held-out
    split (the built-in task's, or data.eval_source)."""
    probe_tokens: int = Field(2048, ge=1)
    """At most this many probe tokens (whole examples, in order)."""
    skip_first_token: bool = True
    """Leave each sequence's first token out of the feature term and the probe: attention-sink
    tokens carry activations orders of magnitude above the rest (SmolLM2 layer 15: 29264 vs
    at most 147 elsewhere) that would dominate an MSE or linear CKA."""
    probe_every: int = Field(0, ge=0)
    """Also run the probe every N steps (it always runs at step 0 and at each checkpoint)."""


class OnPolicyConfig(Section):
    """On-policy distillation (GKD, Agarwal et al. 2024): at each optimizer step, with
    probability lmbda, the completions of the step's prompts are sampled from the student
    itself and the teacher scores them; otherwise they come from the dataset."""

    lmbda: float = Field(0.0, ge=0.0, le=1.0)
    """Probability that an optimizer step trains on student samples (one draw per step from
    (train.seed, step): the same on every process). 0: off-policy only; 1: always on-policy.
    With lmbda > 0 the divergence defaults to jsd (objective.jsd_beta) unless set."""
    max_new_tokens: int = Field(64, ge=1)
    """Most tokens sampled per completion (a sample stops at EOS)."""
    min_new_tokens: int = Field(0, ge=0)
    """EOS cannot be sampled before this many tokens (benchmarks force full-length samples)."""
    temperature: float = Field(1.0, ge=0.0)
    """Sampling temperature of the rollouts (0: greedy). Not the loss temperature, which is
    objective.temperature."""
    top_k: int = Field(0, ge=0)
    """Sample among the k most likely tokens only; 0: no top-k filter."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling: the smallest set of tokens with this much mass; 1: no filter."""
    rollout_batch_size: int | None = Field(None, ge=1)
    """Prompts sampled at once; null: all of this process's prompts of the step together."""


class RationaleConfig(Section):
    """How rows that carry a rationale are learned (Distilling Step-by-Step, Hsieh et al.
    2023). Rows need 'rationale' and 'answer' for answer_only and multitask: the built-in
    task has both, `distill curate` writes both."""

    mode: Literal["completion", "answer_only", "multitask"] = "completion"
    """'completion': the row's completion is the one target (for teacher rationales:
    rationale then answer); 'answer_only': the answer alone (the label-only baseline);
    'multitask': two tasks on the same input, label_prefix + prompt -> answer and
    rationale_prefix + prompt -> rationale; evaluation runs the label task only."""
    weight: float = Field(1.0, ge=0.0)
    """lambda of multitask: loss = L_label + lambda * L_rationale, each term normalised by
    its own task's valid tokens (any KD or feature term rides along inside each task)."""
    label_prefix: str = "predict: "
    """Put before the prompt of the label task."""
    rationale_prefix: str = "explain: "
    """Put before the prompt of the rationale task."""


class EvalConfig(Section):
    max_new_tokens: int = Field(48, ge=1)
    """Tokens generated per held-out prompt (greedy)."""
    batch_size: int = Field(128, ge=1)
    """Prompts generated at once."""
    answer_format: str = "auto"
    """Where the answer is in a generation (`distill.eval.answers`): auto, gsm8k, boxed,
    answer_line, chain or regex:PATTERN. The built-in task always uses chain."""
    teacher: bool = True
    """Also evaluate the run's teacher (when it has one) and compare: top-1 agreement,
    held-out divergences, the teacher's accuracy and loss, generation length drift."""
    calibration_bins: int = Field(15, ge=1)
    """Equal-width confidence bins of the expected calibration error."""
    refusal_patterns: list[str] = [r"\bI can(?:'|’)?t\b", r"\bI cannot\b", r"\bI(?:'|’)m sorry\b", r"\bAs an AI\b"]
    """Regular expressions (searched, case-insensitive) that mark a generation as a refusal."""
    format_regex: str | None = None
    """A regular expression every generation should match whole (format adherence); null:
    not checked (the built-in task checks its own format: steps, '#', one digit)."""
    format_json_schema: dict[str, Any] | None = None
    """A JSON schema every generation should parse as and validate against (format adherence)."""
    text_prompt_tokens: int = Field(32, ge=1)
    """{"text"} rows: the first this many tokens of a held-out row (at most half of it) are
    the prompt both models continue greedily for the generation-length drift."""
    text_generations: int = Field(64, ge=0)
    """{"text"} rows: how many held-out rows give a prompt for the generation-length drift
    (each generates up to max_new_tokens); 0 leaves generation out."""

    @field_validator("answer_format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        from distill.eval.answers import splitter

        try:
            splitter(value)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return value

    @field_validator("refusal_patterns", "format_regex", "format_json_schema")
    @classmethod
    def _valid_format(cls, value, info: ValidationInfo):
        from jsonschema import SchemaError, validators

        if value is None:
            return value
        if info.field_name == "format_json_schema":
            try:
                validators.validator_for(value).check_schema(value)
            except SchemaError as e:
                raise ValueError(f"not a valid JSON schema ({e.message})") from None
            return value
        for pattern in [value] if isinstance(value, str) else value:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{pattern!r} is not a valid regular expression ({e})") from None
        return value


class _Gates(Section):
    """Release gates checked by `distill eval --gates` (`distill.eval.gates`): metric -> an operator
    (>=, <=, >, <, ==) then a number, 'teacher' or 'NUMBER * teacher'. Unset gates are off."""

    @field_validator("*")
    @classmethod
    def _parses(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            parse_gate(info.field_name, value)
        return value

    @model_serializer(mode="wrap")
    def _set_only(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}

    def expressions(self) -> dict[str, str]:
        """The gates that are set: metric -> expression."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


# One optional expression per gate metric, documented where the metrics are (distill.eval.gates).
GatesConfig = create_model(
    "GatesConfig", __base__=_Gates, **{m: (str | None, Field(None, description=d)) for m, (_, _, d) in GATE_METRICS.items()}
)


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
        if self.on_policy.lmbda > 0 or self.rationale.mode == "multitask":
            if self.data.packing:
                why = "on_policy.lmbda > 0 samples completions of whole prompts"
                if self.on_policy.lmbda == 0:
                    why = "rationale.mode=multitask trains two tasks aligned row by row"
                raise ValueError(f"data.packing=true packs rows into blocks, but {why}; set data.packing=false")
            if self.data.packing is None:
                self.data.packing = False  # null resolves to whole rows here
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
