"""Students cut from the teacher by measured importance (Minitron style): `student --prune`.

    distill student --from packaged:smollm2-135m-instruct --prune --layers 10 \\
        --intermediate-size 1024 --out students/smol-pruned
    distill student --from TEACHER --prune --params 60M --out DIR

The scores come from `importance.measure_importance` on the teacher, over calibration text
(a JSONL file's first rows, or CPython's language reference). From them (`RULES`):

- depth: the N layers whose skipping raises the calibration loss most;
- heads: per kept layer, whole key-value groups and, inside each kept group, the same
  number of query heads (the student's heads / kv_heads), so every group stays valid;
- MLP neurons: per kept layer, the neurons with the largest mean |act(gate) * up|;
- hidden channels: one set for the whole model, scored over the kept layers' norms and the
  final norm; every tensor on the residual stream loses the same channels (embeddings,
  every hidden-size norm, q/k/v and gate/up inputs, o/down outputs, lm_head; tied
  embeddings stay tied).

Kept indices stay in increasing order, so keeping everything is the teacher exactly.
gemma3 scales its embeddings by sqrt(hidden_size) of the config: with fewer channels the
embedding weights are multiplied by sqrt(teacher hidden / student hidden) so the residual
stream keeps the teacher's values, and with tied embeddings the final norm's (1 + w) is
divided by the same factor so the logits are unchanged. What no rescaling can keep: each
RMSNorm now averages over the kept channels only (the approximation every hidden prune makes).
"""

import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from distill.errors import DistillError
from distill.models.calibration import CALIBRATION_ROWS, calibration_batches, calibration_texts
from distill.models.importance import Importance, measure_importance
from distill.models.loading import count_parameters, load_causal_lm, load_tokenizer
from distill.models.prune_targets import (
    Dims,
    head_dim,
    parse_params,
    pruned_config,
    target_dims,
    teacher_dims,
)  # fmt: skip
from distill.models.students import decoder_layers, save_student
from distill.progress import Progress

RULES = {
    "layers": "keep the N layers with the largest skip_loss_increase (ties: larger block_influence, then lower index)",
    "heads": "per layer: best kv_heads groups by the sum of their best heads/kv_heads query-head scores, those heads kept",
    "neurons": "per layer: the intermediate_size neurons with the largest mean |act(gate) * up|",
    "hidden": "the hidden_size channels with the largest mean |norm output| summed over the kept layers' norms and the final norm",
}
# What each axis of a parameter indexes, by name suffix (first match wins): H hidden
# channels, Q query-head rows, K key-value-head rows, I MLP neurons, - everything.
_AXES = (
    ("q_norm.weight", "-"), ("k_norm.weight", "-"), ("norm.weight", "H"),
    ("embed_tokens.weight", "-H"), ("lm_head.weight", "-H"),
    ("q_proj.weight", "QH"), ("q_proj.bias", "Q"),
    ("k_proj.weight", "KH"), ("k_proj.bias", "K"), ("v_proj.weight", "KH"), ("v_proj.bias", "K"),
    ("o_proj.weight", "HQ"), ("o_proj.bias", "H"),
    ("gate_proj.weight", "IH"), ("gate_proj.bias", "I"), ("up_proj.weight", "IH"), ("up_proj.bias", "I"),
    ("down_proj.weight", "HI"), ("down_proj.bias", "H"),
)  # fmt: skip


@dataclass
class Kept:
    """Teacher indices the student keeps; per-layer lists follow the kept layers' order."""

    layers: list[int]
    hidden: list[int]
    heads: list[list[int]]  # query heads
    kv_heads: list[list[int]]  # key-value groups
    neurons: list[list[int]]


def top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest of (n,) scores, in increasing order (ties: the lower index)."""
    return sorted(torch.sort(scores, descending=True, stable=True).indices[:k].tolist())


def choose_layers(imp: Importance, n: int) -> list[int]:
    """The n layers whose skipping costs the most calibration loss, in order."""
    rank = sorted(range(len(imp.skip_loss)), key=lambda i: (-imp.skip_increase[i], -imp.block_influence[i], i))
    return sorted(rank[:n])


def choose_heads(scores: torch.Tensor, teacher_kv: int, kv: int, per_group: int) -> tuple[list[int], list[int]]:
    """(query heads, key-value groups) kept in one layer.

    Args:
        scores: (h,) query-head scores; head j reads key-value group j // (h / teacher_kv).
        teacher_kv: The teacher's key-value heads.
        kv: Key-value groups to keep.
        per_group: Query heads to keep in each kept group.
    """
    r = scores.shape[0] // teacher_kv
    best = torch.sort(scores.view(teacher_kv, r), dim=1, descending=True, stable=True)  # (g, r) each
    groups = top(best.values[:, :per_group].sum(1), kv)  # group score: the heads it would keep
    heads = [g * r + j for g in groups for j in sorted(best.indices[g, :per_group].tolist())]
    return heads, groups


def choose_kept(imp: Importance, teacher: Dims, dims: Dims) -> Kept:
    """What the student of shape `dims` keeps of the teacher, by the rules above."""
    layers = choose_layers(imp, dims.layers)
    per_group = dims.heads // dims.kv_heads
    heads = [choose_heads(imp.heads[i], teacher.kv_heads, dims.kv_heads, per_group) for i in layers]
    return Kept(
        layers=layers,
        hidden=top(imp.hidden_scores(layers), dims.hidden_size),
        heads=[q for q, _ in heads],
        kv_heads=[g for _, g in heads],
        neurons=[top(imp.neurons[i], dims.intermediate_size) for i in layers],
    )


def _head_rows(heads: list[int], size: int) -> torch.Tensor:
    """Weight rows of whole heads of `size` rows each."""
    return torch.tensor([h * size + j for h in heads for j in range(size)], dtype=torch.long)


def _cut(name: str, tensor: torch.Tensor, index: dict[str, torch.Tensor]) -> torch.Tensor:
    """The kept part of one teacher parameter (a copy)."""
    axes = next((axes for suffix, axes in _AXES if name.endswith(suffix)), None)
    if axes is None or len(axes) != tensor.dim():
        raise DistillError(f"--prune: no rule to cut the parameter {name} {tuple(tensor.shape)}")
    for axis, kind in enumerate(axes):
        if kind != "-":
            tensor = tensor.index_select(axis, index[kind])
    return tensor.clone()


def cut_state(teacher, keys, kept: Kept) -> dict[str, torch.Tensor]:
    """The student's state dict (its `keys`) cut from the teacher's parameters."""
    prefix, _ = decoder_layers(teacher)
    layer_key = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    size = head_dim(teacher.config.get_text_config())
    source = teacher.state_dict()
    hidden = torch.tensor(kept.hidden, dtype=torch.long)
    state = {}
    for key in keys:
        m = layer_key.match(key)
        if m is None:  # embeddings, final norm, lm_head
            state[key] = _cut(key, source[key], {"H": hidden})
            continue
        j = int(m.group(1))
        index = {"H": hidden, "Q": _head_rows(kept.heads[j], size), "K": _head_rows(kept.kv_heads[j], size),
                 "I": torch.tensor(kept.neurons[j], dtype=torch.long)}  # fmt: skip
        state[key] = _cut(key, source[f"{prefix}.{kept.layers[j]}.{m.group(2)}"], index)
    return state


def _tied(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def _rescale_gemma_embeddings(state: dict, teacher_hidden: int, hidden: int, tied: bool) -> float:
    """Keep gemma3's sqrt(hidden_size) embedding scale at the teacher's value (module docstring)."""
    factor = math.sqrt(teacher_hidden / hidden)  # (teacher scale) / (student scale)
    emb = state["model.embed_tokens.weight"]  # (V, H')
    state["model.embed_tokens.weight"] = (emb.double() * factor).to(emb.dtype)
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
        w = state["model.norm.weight"]  # (H',) the norm scales by (1 + w)
        state["model.norm.weight"] = ((1 + w.double()) / factor - 1).to(w.dtype)
    return factor


def prune_model(teacher, kept: Kept, dims: Dims) -> tuple[object, float | None]:
    """The student: its config from the teacher's, its weights cut from the teacher's.

    Returns:
        (student in eval mode, gemma3 embedding rescale factor or None).
    """
    config = pruned_config(teacher.config, kept.layers, dims)
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; leave the caller's RNG alone
        student = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype)
    state = cut_state(teacher, student.state_dict().keys(), kept)
    factor = None
    teacher_hidden = teacher.config.get_text_config().hidden_size
    if config.model_type == "gemma3_text" and dims.hidden_size != teacher_hidden:
        factor = _rescale_gemma_embeddings(state, teacher_hidden, dims.hidden_size, _tied(student))
    student.load_state_dict(state, strict=True)
    return student.eval(), factor


def _rounded(x) -> list | float:
    """Scores for student.json: 6 significant digits, tensors as (nested) lists."""
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    return [_rounded(v) for v in x] if isinstance(x, list) else float(f"{x:.6g}")


def importance_record(imp: Importance, kept: Kept) -> dict:
    """The measured scores (every teacher layer; hidden as used for the kept layers)."""
    return {
        "loss": _rounded(imp.loss),
        "skip_loss": _rounded(imp.skip_loss),
        "skip_loss_increase": _rounded(imp.skip_increase),
        "block_influence": _rounded(imp.block_influence),
        "heads": _rounded(imp.heads),
        "neurons": _rounded(imp.neurons),
        "hidden": _rounded(imp.hidden_scores(kept.layers)),
    }


def _progress(enabled: bool):
    """A progress callback for `measure_importance`: the project's bar, labelled importance."""
    state: dict = {}

    def report(done: int, total: int, loss: float, tokens: int) -> None:
        bar = state.setdefault("bar", Progress(total, enabled=enabled, label="importance"))  # at done == 0
        if done:
            bar.update(done, loss, tokens / max(time.perf_counter() - bar.t0, 1e-9))
        if done == total:
            bar.close()

    return report


def measure_teacher(
    teacher_name: str, calibration: str | None = None, calibration_rows: int | None = None, dtype: str = "float32"
) -> Importance:
    """The importance scores `make_pruned_student` would measure, for reuse across targets."""
    teacher = load_causal_lm(name=teacher_name, dtype=dtype)
    texts = calibration_texts(calibration, CALIBRATION_ROWS if calibration_rows is None else calibration_rows)
    return measure_importance(teacher, calibration_batches(texts, load_tokenizer(teacher_name)), _progress(False))


def make_pruned_student(
    teacher_name: str,
    out: str | Path,
    layers: int | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    params: str | int | None = None,
    calibration: str | None = None,
    calibration_rows: int | None = None,
    dtype: str = "float32",
    show_progress: bool = True,
    importance: Importance | None = None,
) -> dict:
    """Prune `teacher_name` to a student and save it to `out` (whole or not at all).

    Every option left None keeps the teacher's size; `params` chooses the hidden and MLP
    sizes not given (`prune_targets.target_dims`). Bad targets and calibration files fail
    before any measuring or writing. `importance`: scores already measured on this teacher
    and calibration (`measure_teacher`), so several students of one teacher measure once.

    Returns:
        The student.json record without its scores and kept indices, plus `out`.
    """
    out = Path(out)
    if out.exists():
        raise DistillError(f"{out} already exists; pick another --out")
    if all(x is None for x in (layers, hidden_size, intermediate_size, heads, kv_heads, params)):
        raise DistillError(
            "--prune needs a target: --layers, --hidden-size, --intermediate-size, --heads, --kv-heads or --params"
        )
    teacher = load_causal_lm(name=teacher_name, dtype=dtype)
    dims = target_dims(teacher.config, layers, hidden_size, intermediate_size, heads, kv_heads, params)
    texts = calibration_texts(calibration, CALIBRATION_ROWS if calibration_rows is None else calibration_rows)
    tokenizer = load_tokenizer(teacher_name)
    imp = importance or measure_importance(teacher, calibration_batches(texts, tokenizer), _progress(show_progress))
    kept = choose_kept(imp, teacher_dims(teacher.config), dims)
    student, factor = prune_model(teacher, kept, dims)
    t = teacher_dims(teacher.config)
    summary = {
        "teacher": teacher_name, "teacher_params": count_parameters(teacher), "teacher_layers": t.layers,
        "init": "pruned", "kept_layers": kept.layers, "teacher_dims": t.as_dict(), "dims": dims.as_dict(),
        "head_dim": head_dim(teacher.config.get_text_config()),
        "params_target": None if params is None else parse_params(str(params)),
        "calibration": {"source": calibration or "builtin:pydoc_topics", "rows": len(texts), "tokens": imp.tokens},
        "gemma3_embedding_rescale": factor, "rules": RULES,
        "layers": dims.layers, "hidden_size": dims.hidden_size, "model_type": student.config.model_type,
    }  # fmt: skip
    record = {**summary, "kept": asdict(kept), "importance": importance_record(imp, kept)}
    save_student(student, tokenizer, out, record, lists_inline=True)
    return {**summary, "out": str(out), "params": count_parameters(student)}
