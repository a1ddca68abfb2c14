"""The `quant` section: quantization-aware distillation and the quantized export."""

from typing import Literal

from pydantic import Field

from distill.config.base import Section


class QuantConfig(Section):
    """Quantize the student (docs/guide/quantization.md). With a scheme set, training
    fake-quantizes the student's linear weights (torchao QAT; `aware`), and the export writes
    RUN/student-<scheme>/ beside RUN/student/: the same weights quantized for real."""

    scheme: Literal["int8", "int4"] | None = None
    """null: no quantization. int8: weight-only, one scale per output row. int4: weight-only,
    one scale per `group_size` input weights (symmetric)."""
    group_size: int = Field(32, ge=2)
    """Input weights sharing one int4 scale; each quantized layer's input size must be a
    multiple of it. Unused by int8."""
    activations: bool = False
    """Also quantize each linear layer's input to int8 per token (dynamic, asymmetric), in
    training and in the export."""
    aware: bool = True
    """true: fake-quantize during training, so the student learns to be good after
    quantization. false: train in full precision and quantize only at the export
    (post-training quantization, the baseline the aware student is compared with)."""
    exclude: list[str] = Field(default_factory=lambda: ["lm_head"])
    """Linear layers left in full precision: a module name, or its last part (`lm_head`,
    `down_proj`). Embeddings are never quantized."""
