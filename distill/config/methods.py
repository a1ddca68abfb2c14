"""The sections of the methods beyond logit KD: feature alignment (`features`), on-policy
sampling (`on_policy`, GKD) and rationale distillation (`rationale`)."""

from typing import Literal

from pydantic import Field

from distill.config.base import Section


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
    sample_dtype: Literal["float32", "bfloat16"] = "float32"
    """The weights the rollouts read. float32: the student's own. bfloat16: a bf16 copy of
    them, refreshed before each rollout (half the bytes read per decoded token; one more
    student in bf16 in memory). The samples then come from a slightly different policy
    than the one trained (docs/guide/on-policy.md has the measured difference); runs stay
    deterministic and resume exactly, and 2 processes equal 1 only within bf16 rounding
    (a row's draws can differ where another batch shape rounds differently). Not with
    train.sharding: fsdp."""
    overlap: bool = False
    """Sample the next on-policy step's completions in a background thread while this step
    trains: a one-step policy lag (those samples come from the weights of the start of
    this step, not of theirs; metrics.jsonl's policy_step names the step whose weights
    sampled). Rollouts then read a copy of the weights (sample_dtype's: with float32 one
    more float32 student in memory), refreshed before each rollout starts. Runs stay
    deterministic, and 2 processes equal 1 as without it. Traded: a resume is not the
    uninterrupted run (its first rollout has no step before it to come from, so it samples
    with the resumed weights). Pays where the rollout and the update do not compete for
    the same units (a GPU with idle capacity while decoding); on CPU they share the cores
    (docs/results.md measures it). Not with train.sharding: fsdp."""
    compile_decode: bool = False
    """Decode rollouts into a static KV cache (the padded prompts plus max_new_tokens,
    rounded up to a multiple of 64 slots) with the decode step compiled by torch.compile:
    fixed shapes, so one compile per cache size and rollout batch size, made at the first
    rollout that needs it (16 to 26 s on 2 CPU cores for SmolLM2's student). Rollouts then
    read a frozen copy of the weights (sample_dtype's: with float32 one more float32
    student in memory). Pays where the decode step's per-call overhead is a large share of
    it; on CPU the step is bound by its matmuls and it gains little (docs/results.md
    measures it). Samples equal the uncompiled path's within float rounding only
    (attention sums over the cache's width), so a run with it is not bit-identical to one
    without; runs stay deterministic, resume exactly, and 2 processes equal 1 within float
    rounding, as with sample_dtype bfloat16. Models with sliding-window layers (gemma3)
    use the static cache uncompiled (their mask changes shape every step). On CPU it needs a
    C++ compiler (torch.compile builds kernels). Not with train.sharding: fsdp."""


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
