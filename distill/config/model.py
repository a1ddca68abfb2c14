"""Where a model comes from (`student:` and `teacher:`), and the check of an inline model config."""

from typing import Any, Literal

from pydantic import field_validator, model_validator

from distill.config.base import Section

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


class ModelConfig(Section):
    """Where a model comes from: exactly one of `name` or `config`."""

    name: str | None = None
    """Hub id, local folder, path to a .gguf file, or a packaged alias ('packaged:smollm2-135m-instruct', 'packaged:gemma-3-270m')."""
    gguf_file: str | None = None
    """A .gguf file inside the folder `name` (transformers' gguf_file argument)."""
    config: dict[str, Any] | None = None
    """An inline transformers config with `model_type` (random init; tests and the demo)."""
    tokenizer: str | None = None
    """Tokenizer source; None means the model's own; 'builtin' is the built-in task's."""
    dtype: Literal["float32", "bfloat16"] | None = None
    """Weights dtype when loaded; null: float32, except a teacher on a machine with CUDA,
    bfloat16 (the student always trains from float32 weights unless set). A frozen teacher in
    bfloat16 is a copy of its weights made
    once, with bf16 matmuls where the CPU (AVX-512 BF16, AMX) or GPU has them; its speed and
    its effect on the loss are measured in benchmarks/real_step.py (docs/results.md). It
    trades a little of one invariance: another batch layout (1 x 8 vs 8 x 1 micro-batches,
    2 processes vs 1) rounds some teacher logits to another bf16 neighbour, so those runs
    agree to about 1e-4 in the weights instead of 1e-5; resume stays exact."""

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
