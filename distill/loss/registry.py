"""The divergence registry: one record per divergence, read by everything that names one.

`DIVERGENCES` maps a name to a `DivergenceSpec`: its per-token value in log space (what
`distill.loss.divergences` computes, dense and on top-k buckets), its closed-form value and
student-logit gradient (what `distill.loss.closed_forms` and the fused loss use), its
parameters (each with a default and the `ObjectiveConfig` field that supplies it in a run),
whether the sparse (top-k + leftover bucket) path may evaluate it, and the parameters it is
evaluated at on held-out data (`distill.eval.metrics.EVAL_DIVERGENCES`), if it is. Config
validation (`objective.divergence`), `ObjectiveConfig.divergence_params`, the tests and the
KD-loss benchmark all derive their lists from it.

The built-in divergences are registered by `distill.loss.divergences` (imported with the
`distill.loss` package, so the table is complete whenever this module is). A new one needs
a single call:

    register_divergence(DivergenceSpec("sym_kl", value=sym_kl, value_and_grad=sym_kl_value_and_grad))
"""

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

# f(log_q, log_p, **params) -> (...): student and teacher log-probs (..., K), one value per row.
ValueFn = Callable[..., torch.Tensor]
# f(log_q, log_p, temperature, **params) -> (values (c,), d(sum of values)/d(student logits) (c, V)).
ValueAndGradFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class DivergenceParam:
    """One scalar parameter of a divergence.

    Attributes:
        name: the keyword the divergence's functions take, e.g. "beta".
        default: its value when a caller does not give it.
        config_field: the `ObjectiveConfig` field that supplies it in a run, e.g. "jsd_beta".
        low: smallest allowed value (inclusive).
        high: largest allowed value (inclusive).
    """

    name: str
    default: float
    config_field: str
    low: float = 0.0
    high: float = 1.0


@dataclass(frozen=True)
class DivergenceSpec:
    """Everything the package needs to know about one divergence D(p, q), p teacher, q student.

    Attributes:
        name: the key in `DIVERGENCES` and the value of `objective.divergence`.
        value: per-token value f(log_q, log_p, **params) -> (...) from student and teacher
            log-probabilities (..., K), fp32/fp64, with 0 log 0 = 0; autograd-differentiable.
        value_and_grad: closed form f(log_q, log_p, temperature, **params) -> (values (c,),
            gradient (c, V)) from (c, V) log-probs at temperature T: the same values as `value`
            and d(sum of values)/d(student logits s), where log_q = log_softmax(s / T). May
            overwrite log_p (scratch space), never log_q.
        params: the divergence's parameters, in the order its functions take them.
        sparse: whether the top-k teacher path (`sparse_per_token`, `sparse_value_and_grad`)
            may evaluate it on the k + 1 buckets (top-k ids + one leftover bucket). True for
            f-divergences, for which bucketing only loses divergence (data processing).
        eval_params: the parameters held-out evaluation computes it at (at T = 1); None: not
            one of the evaluation's divergences.
        summary: one line for listings.
    """

    name: str
    value: ValueFn
    value_and_grad: ValueAndGradFn
    params: tuple[DivergenceParam, ...] = ()
    sparse: bool = True
    eval_params: Mapping[str, float] | None = None
    summary: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(self.params))
        if self.eval_params is not None:  # read-only, like the rest of the record
            object.__setattr__(self, "eval_params", MappingProxyType(dict(self.eval_params)))

    def defaults(self) -> dict[str, float]:
        """{parameter name: default} for every parameter."""
        return {p.name: p.default for p in self.params}

    def check_params(self, params: Mapping[str, float]) -> None:
        """Raise ValueError unless every key of `params` is a parameter of this divergence and
        every value a number within its bounds."""
        by_name = {p.name: p for p in self.params}
        for key, value in params.items():
            if key not in by_name:
                allowed = [p.name for p in self.params] or "none"
                raise ValueError(f"divergence {self.name!r} takes no parameter {key!r} (it takes {allowed})")
            p = by_name[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not p.low <= value <= p.high:
                raise ValueError(f"divergence {self.name!r}: {key} must be a number in [{p.low:g}, {p.high:g}], got {value!r}")

    def bind(self, params: Mapping[str, float]) -> dict[str, float]:
        """`params` checked (`check_params`) and completed with the defaults, in `self.params` order."""
        self.check_params(params)
        return {p.name: params.get(p.name, p.default) for p in self.params}


DIVERGENCES: dict[str, DivergenceSpec] = {}
"""The registry: name -> record, in registration order (the built-ins first)."""


def register_divergence(spec: DivergenceSpec) -> DivergenceSpec:
    """Add `spec` to `DIVERGENCES`; a name already registered is an error.

    Args:
        spec: the record; its name must be an identifier-like string (letters, digits, _).

    Returns:
        `spec`, so a module can keep it: `SYM_KL = register_divergence(DivergenceSpec(...))`.
    """
    if not (isinstance(spec.name, str) and spec.name.isidentifier()):
        raise ValueError(f"divergence name must be an identifier-like string, got {spec.name!r}")
    if spec.name in DIVERGENCES:
        raise ValueError(f"divergence {spec.name!r} is already registered")
    names = [p.name for p in spec.params]
    if len(set(names)) != len(names):
        raise ValueError(f"divergence {spec.name!r}: parameter names repeat: {names}")
    for p in spec.params:
        if not (math.isfinite(p.low) and math.isfinite(p.high) and p.low <= p.default <= p.high):
            raise ValueError(f"divergence {spec.name!r}: {p.name} default {p.default!r} is not in [{p.low}, {p.high}]")
    if spec.eval_params is not None:
        spec.check_params(spec.eval_params)
    DIVERGENCES[spec.name] = spec
    return spec


def unregister_divergence(name: str) -> DivergenceSpec:
    """Remove `name` from `DIVERGENCES` and return its record (tests register temporary ones)."""
    get_divergence(name)
    return DIVERGENCES.pop(name)


def nearest_divergence(name: str) -> str | None:
    """The registered name closest to `name` (difflib, cutoff 0.5), or None."""
    near = difflib.get_close_matches(str(name), list(DIVERGENCES), n=1, cutoff=0.5)
    return near[0] if near else None


def get_divergence(name: str) -> DivergenceSpec:
    """The record of `name`; ValueError naming the registered names (and the nearest) if none."""
    spec = DIVERGENCES.get(name) if isinstance(name, str) else None
    if spec is None:
        near = nearest_divergence(name)
        hint = f" (did you mean {near!r}?)" if near else ""
        raise ValueError(f"unknown divergence {name!r}{hint}; expected one of {sorted(DIVERGENCES)}")
    return spec


def check_divergence(name: str, params: Mapping[str, float], temperature: float, sparse: bool = False) -> DivergenceSpec:
    """The record of `name`, after checking its parameters and the temperature.

    Args:
        name: a key of `DIVERGENCES`.
        params: parameters given by the caller (a subset of the divergence's).
        temperature: loss temperature, a finite number > 0.
        sparse: also require that the top-k teacher path may evaluate it (`DivergenceSpec.sparse`).

    Returns:
        `DIVERGENCES[name]`. Raises ValueError naming the problem otherwise.
    """
    spec = get_divergence(name)
    spec.check_params(params)
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if sparse and not spec.sparse:
        raise ValueError(f"divergence {name!r} has no top-k form: it cannot be used with a cached (sparse) teacher")
    return spec


def resolve_divergence(name: str, params: Mapping[str, float], temperature: float) -> ValueFn:
    """The per-token value function of `name`, after `check_divergence(name, params, temperature)`."""
    return check_divergence(name, params, temperature).value


def eval_divergences() -> dict[str, dict[str, float]]:
    """name -> parameters of every divergence held-out evaluation computes, in registry order."""
    return {name: dict(spec.eval_params) for name, spec in DIVERGENCES.items() if spec.eval_params is not None}
