"""Quantization of a student with torchao: the schemes, fake quantization for training
(quantization-aware distillation) and real quantization for the export.

Every scheme is weight-only affine quantization held as torchao's IntxUnpackedToInt8Tensor
(int8 data, a float scale and a zero point per block), the one layout that runs on CPU and
on CUDA alike and whose QAT fake quantization is the same arithmetic: a fake-quantized
forward equals the quantized model's forward.

    int8: 8-bit weights, one scale per output row (block 1 x in_features), symmetric
    int4: 4-bit weights, one scale per `group_size` inputs (block 1 x group_size), symmetric
    activations=True: each quantized layer's input also int8, per token, asymmetric
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from distill.errors import DistillError

SCHEMES = ("int8", "int4")
BITS = {"int8": 8, "int4": 4}
TORCHAO_PIP = "pip install 'torchao>=0.18,<0.19'  (or: pip install 'distill[quant]')"


@dataclass(frozen=True)
class Scheme:
    """What a quantized student is: the scheme, int4's group size, activation quantization,
    and the linear layers left in full precision (a module name or its last part)."""

    name: str
    group_size: int = 32
    activations: bool = False
    exclude: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        if self.name not in SCHEMES:
            raise DistillError(f"unknown quantization scheme {self.name!r}; known: {', '.join(SCHEMES)}")
        if self.group_size < 2:
            raise DistillError(f"quant.group_size must be >= 2, got {self.group_size}")

    @classmethod
    def from_config(cls, q) -> Scheme:
        """From a run config's `quant` section (whose scheme is set)."""
        return cls(q.scheme, q.group_size, q.activations, tuple(q.exclude))

    def block(self, in_features: int) -> int:
        """Input weights per scale: the whole row for int8, the group for int4."""
        return in_features if self.name == "int8" else self.group_size

    def record(self) -> dict:
        return {"scheme": self.name, "bits": BITS[self.name], "group_size": self.group_size if self.name == "int4" else None,
                "activations": self.activations, "exclude": list(self.exclude)}


def torchao():
    """The torchao module, imported quietly (its optional CUDA kernels log a warning each on a
    CPU machine); a one-line DistillError naming the pip command when it is not installed."""
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        import torchao as module
        import torchao.quantization  # the quantize_ API and its configs
        import torchao.quantization.qat
    except ImportError:
        raise DistillError(f"quantization needs torchao, which is not installed: {TORCHAO_PIP}") from None
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    return module


def base_config(scheme: Scheme):
    """The torchao config that quantizes a linear layer's weight (and input) by `scheme`."""
    q = torchao().quantization
    granularity = q.PerAxis(0) if scheme.name == "int8" else q.PerGroup(scheme.group_size)
    dtype = torch.int8 if scheme.name == "int8" else torch.int4
    if scheme.activations:
        return q.Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity)
    return q.IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity)


def excluded(name: str, exclude: tuple[str, ...]) -> bool:
    return any(name == e or name.endswith("." + e) for e in exclude)


def quantized_linears(model: torch.nn.Module, scheme: Scheme) -> list[str]:
    """Names of the linear layers `scheme` quantizes, in module order; a layer whose input
    size int4's groups do not divide is a DistillError naming it and quant.group_size."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or excluded(name, scheme.exclude):
            continue
        if module.in_features % scheme.block(module.in_features):
            raise DistillError(
                f"{name}: input size {module.in_features} is not a multiple of quant.group_size "
                f"{scheme.group_size} (int4 groups); choose a divisor, e.g. 32, or add it to quant.exclude"
            )
        names.append(name)
    if not names:
        raise DistillError(f"the model has no linear layer to quantize outside quant.exclude {list(scheme.exclude)}")
    return names


def _apply(model: torch.nn.Module, config, names: list[str]) -> None:
    chosen = set(names)
    torchao().quantization.quantize_(model, config, filter_fn=lambda _m, fqn: fqn in chosen)


def prepare_qat(model: torch.nn.Module, scheme: Scheme) -> list[str]:
    """Fake-quantize `model`'s linear layers in place for training (torchao QAT, prepare step):
    the forward rounds weights (and inputs) as `quantize_model` will, the backward passes the
    gradient straight through. Parameter names and shapes stay those of the plain model, so
    checkpoints and the exported student/ are ordinary full-precision weights."""
    names = quantized_linears(model, scheme)
    qat = torchao().quantization.qat
    _apply(model, qat.QATConfig(base_config(scheme), step="prepare"), names)
    return names


def quantize_model(model: torch.nn.Module, scheme: Scheme) -> list[str]:
    """Quantize `model`'s linear layers in place (weights become IntxUnpackedToInt8Tensor);
    returns their names. The model is for inference from then on."""
    names = quantized_linears(model, scheme)
    model.requires_grad_(False)
    _apply(model, base_config(scheme), names)
    return names


def is_quantized(model: torch.nn.Module) -> bool:
    """True for a model `quantize_model` (or `load_quantized`) made."""
    return getattr(model, "distill_quant", None) is not None
