"""The shape of a pruned student: from dimensions given, or chosen to fit a parameter count.

The head size (head_dim) is always the teacher's: heads are cut whole. llama, qwen2 and
gemma3_text read `head_dim` from the config, so the hidden size need not equal heads x
head_dim; the student's config states head_dim explicitly. transformers' llama and gemma3
configs still refuse a hidden size that is not a multiple of the number of query heads (5.24
on): a shape the config refuses is a one-line error, and `--params` skips it. SmolLM2's 9
heads leave it no smaller hidden size than its own 576 (lcm of 9 and 64); 6 heads allow 384.

`--params N` rule: depth is the teacher's (or `--layers`), heads are the teacher's (or
`--heads` / `--kv-heads`), and the hidden and MLP sizes not given shrink by one common factor,
each rounded down to a multiple of the width unit (below), to the largest student with at
most N parameters (tied embeddings counted once). Minitron found width pruning better than
depth pruning at equal size once retrained, hence width first.
"""

import math
import re
from dataclasses import asdict, dataclass

import torch
from transformers import AutoModelForCausalLM

from distill.errors import DistillError
from distill.models.loading import count_parameters
from distill.models.students import drop_config

SUPPORTED = ("llama", "qwen2", "gemma3_text")


@dataclass(frozen=True)
class Dims:
    """A decoder's shape: what pruning can change."""

    layers: int
    hidden_size: int
    intermediate_size: int
    heads: int
    kv_heads: int

    def as_dict(self) -> dict:
        return asdict(self)


def check_family(config) -> None:
    """One-line error unless pruning knows this model family's parameter layout."""
    if config.model_type not in SUPPORTED:
        raise DistillError(f"--prune supports {', '.join(SUPPORTED)} models, not {config.model_type!r}")


def head_dim(text) -> int:
    """The head size a text config gives its attention (explicit, or hidden / heads)."""
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def width_unit(text) -> int:
    """Hidden sizes are multiples of gcd(teacher hidden size, head size): 64 for SmolLM2
    (576, 64), 128 for Gemma-3-270M (640, 256); the teacher's own size always is one."""
    return math.gcd(text.hidden_size, head_dim(text))


def teacher_dims(config) -> Dims:
    text = config.get_text_config()
    kv = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return Dims(text.num_hidden_layers, text.hidden_size, text.intermediate_size, text.num_attention_heads, kv)


def parse_params(text: str) -> int:
    """'60M', '1.5B', '800k', '60000000' -> a parameter count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMbB]?)\s*", text)
    if m is None:
        raise DistillError(f"--params {text!r}: give a count such as 60M, 1.5B or 800K")
    return int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()])


def _heads(t: Dims, heads: int | None, kv_heads: int | None) -> tuple[int, int]:
    """Query and key-value heads of the student: given, else the teacher's grouping kept."""
    per_group = t.heads // t.kv_heads
    for name, value, most in (("--heads", heads, t.heads), ("--kv-heads", kv_heads, t.kv_heads)):
        if value is not None and not 1 <= value <= most:
            raise DistillError(f"{name} {value}: the teacher has {most}; keep between 1 and {most}")
    if heads is None and kv_heads is None:
        return t.heads, t.kv_heads
    if heads is None:
        heads = kv_heads * per_group  # whole key-value groups
    if kv_heads is None:
        kv_heads = min(t.kv_heads, heads)
    if heads % kv_heads:
        raise DistillError(f"{heads} attention heads are not a multiple of {kv_heads} key-value heads")
    if heads // kv_heads > per_group:
        raise DistillError(
            f"{heads} heads over {kv_heads} key-value heads is {heads // kv_heads} per group; "
            f"the teacher's groups hold {per_group}"
        )
    return heads, kv_heads


def refused(config, dims: Dims) -> str | None:
    """Why transformers' config class refuses a student of this shape, or None."""
    try:
        text = pruned_config(config, list(range(dims.layers)), dims).get_text_config()
        getattr(text, "validate", lambda: None)()
    except Exception as e:  # noqa: BLE001 (ValueError, or huggingface_hub's StrictDataclassError: neither subclasses the other)
        return str(e).strip().splitlines()[-1].strip()
    return None


def check_dims(config, layers, hidden_size, intermediate_size, heads, kv_heads) -> Dims:
    """The student's shape from the options given (None: the teacher's), checked."""
    t, text = teacher_dims(config), config.get_text_config()
    for name, value, most in (("--layers", layers, t.layers), ("--hidden-size", hidden_size, t.hidden_size),
                              ("--intermediate-size", intermediate_size, t.intermediate_size)):  # fmt: skip
        if value is not None and not 1 <= value <= most:
            raise DistillError(f"{name} {value}: the teacher has {most}; keep between 1 and {most}")
    unit = width_unit(text)
    if hidden_size is not None and hidden_size % unit:
        raise DistillError(
            f"--hidden-size {hidden_size} is not a multiple of {unit} "
            f"(the teacher's head size {head_dim(text)}, or its gcd with the hidden size {t.hidden_size})"
        )
    h, kv = _heads(t, heads, kv_heads)
    return Dims(layers or t.layers, hidden_size or t.hidden_size, intermediate_size or t.intermediate_size, h, kv)


def pruned_config(config, keep_layers: list[int], dims: Dims):
    """The teacher's config with the kept layers (and their per-layer settings) and widths."""
    hd = head_dim(config.get_text_config())
    config = drop_config(config, keep_layers)  # a copy
    text = config.get_text_config()
    text.hidden_size, text.intermediate_size = dims.hidden_size, dims.intermediate_size
    text.num_attention_heads, text.num_key_value_heads = dims.heads, dims.kv_heads
    text.head_dim = hd  # explicit: hidden need not be heads x head_dim (qwen2 reads it too)
    return config


def count_for(config, dims: Dims) -> int:
    """Parameters of a student of this shape (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(pruned_config(config, list(range(dims.layers)), dims))
    return count_parameters(model)


def _round_down(size: float, unit: int) -> int:
    return max(unit, math.floor(size / unit + 1e-9) * unit)


def fit_params(config, dims: Dims, target: int, hidden_given: bool, intermediate_given: bool) -> Dims:
    """The largest student of shape `dims` with at most `target` parameters (the rule above)."""
    if hidden_given and intermediate_given:
        raise DistillError("--params chooses the hidden and MLP sizes: drop --hidden-size or --intermediate-size")
    t, unit = teacher_dims(config), width_unit(config.get_text_config())
    teacher_count = count_for(config, t)
    if target >= teacher_count:
        raise DistillError(f"--params {target:,}: the teacher has {teacher_count:,}; ask for fewer")
    free = t.intermediate_size if hidden_given else t.hidden_size  # the size the steps walk down
    smallest, skipped = None, 0
    for k in range(max(1, free // unit), 0, -1):
        scale = k * unit / free  # 1 on the first step when the size is a multiple of the unit
        hidden = dims.hidden_size if hidden_given else k * unit
        inter = dims.intermediate_size if intermediate_given else t.intermediate_size
        if not intermediate_given and scale < 1:
            inter = _round_down(t.intermediate_size * scale, unit)
        candidate = Dims(dims.layers, hidden, inter, dims.heads, dims.kv_heads)
        if refused(config, candidate):
            skipped += 1  # e.g. a llama hidden size that is not a multiple of its heads
            continue
        smallest = count_for(config, candidate)
        if smallest <= target:
            return candidate
    hint = (f"; {config.model_type}'s config refuses {skipped} smaller hidden sizes with {dims.heads} attention heads "
            "(cut heads with --heads, or give --intermediate-size)") if skipped else ""  # fmt: skip
    if smallest is None:
        raise DistillError(f"--params {target:,}: {config.model_type}'s config refuses every hidden size with {dims.heads} attention heads")
    raise DistillError(f"--params {target:,}: the smallest student of this shape has {smallest:,} parameters{hint}")


def target_dims(config, layers, hidden_size, intermediate_size, heads, kv_heads, params: str | int | None) -> Dims:
    """The student's shape for `--prune`: the family checked, the options checked, `--params` fitted."""
    check_family(config)
    dims = check_dims(config, layers, hidden_size, intermediate_size, heads, kv_heads)
    why = refused(config, dims) if params is None or hidden_size is not None else None  # else --params picks the hidden size
    if why:
        raise DistillError(
            f"hidden size {dims.hidden_size} with {dims.heads} attention heads: {config.model_type}'s config refuses it ({why})"
        )
    if params is None:
        return dims
    return fit_params(config, dims, parse_params(str(params)), hidden_size is not None, intermediate_size is not None)
