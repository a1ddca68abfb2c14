"""Feature alignment: student hidden states mapped into the teacher's space.

A layer map pairs student and teacher hidden states; one learned projector per pair maps
the student's width to the teacher's; the feature term is the weighted mean over pairs of
a per-token feature loss (`distill.loss.token_losses.feature_loss`), summed over valid tokens like
every other term:

    loss = (1 - alpha) * CE + alpha * T^2 * D + beta * sum_p w_p * F(P_p(h_s), h_t) / sum_p w_p

Pairs are indices into the models' own `output_hidden_states` tuples: 0 is the input
embeddings and i the output of decoder layer i - 1 (the last one after the final norm).
The projectors train with the student, are checkpointed with the run, and are exported to
RUN/projectors/, never into the exported student.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from distill import rundir
from distill.config import FeatureConfig
from distill.errors import ConfigError
from distill.loss.token_losses import feature_loss
from distill.paths import atomic_folder


@dataclass(frozen=True)
class Pair:
    student: int  # index into the student's hidden_states (0: embeddings)
    teacher: int  # index into the teacher's hidden_states
    weight: float


def layer_name(index: int) -> int | str:
    """A hidden_states index as the config names it: 'embeddings' or the 0-based layer."""
    return "embeddings" if index == 0 else index - 1


def pair_record(p: Pair) -> dict:
    """A pair for the run directory: hidden_states indices (`student`, `teacher`, which key
    the latents) and the layers as `features.layers` names them."""
    return {**vars(p), "student_layer": layer_name(p.student), "teacher_layer": layer_name(p.teacher)}


def num_layers(model) -> int:
    return model.config.get_text_config().num_hidden_layers


def hidden_size(model) -> int:
    return model.config.get_text_config().hidden_size


def uniform_teacher_layer(i: int, n_student: int, n_teacher: int) -> int:
    """The teacher layer (0-based) for student layer i: round((i + 1) * L_t / L_s) - 1, halves up."""
    return math.floor((i + 1) * n_teacher / n_student + 0.5) - 1


def _index(layer: int | str, n: int, key: str, role: str) -> int:
    if layer == "embeddings":
        return 0
    if not 0 <= layer < n:
        raise ConfigError(f"{key}: {role} layer {layer} does not exist; the {role} has layers 0..{n - 1} (or 'embeddings')")
    return layer + 1


def kept_layers(student_name: str | None) -> list[int]:
    """The teacher layers a layer-drop student was copied from (its folder's student.json)."""
    record = Path(student_name or "") / "student.json"
    kept = json.loads(record.read_text()).get("kept_layers") if student_name and record.is_file() else None
    if not kept:
        raise ConfigError(
            f"features.layers=kept needs a layer-drop student made by `distill student`; {student_name!r} has no "
            "student.json listing kept_layers"
        )
    return kept


def layer_pairs(fcfg: FeatureConfig, n_student: int, n_teacher: int, kept: list[int] | None = None) -> list[Pair]:
    """Resolve `features.layers` (+ `features.embeddings`) against the two models' depths;
    `kept`: for 'kept', the teacher layer each student layer was copied from."""
    if fcfg.layers == "kept":
        if kept is None or len(kept) != n_student or not all(0 <= k < n_teacher for k in kept):
            raise ConfigError(f"features.layers=kept: kept layers {kept} do not fit a {n_student}-layer student of a {n_teacher}-layer teacher")
        pairs = [Pair(i + 1, k + 1, 1.0) for i, k in enumerate(kept)]
    elif fcfg.layers == "uniform":
        pairs = [Pair(i + 1, uniform_teacher_layer(i, n_student, n_teacher) + 1, 1.0) for i in range(n_student)]
    elif fcfg.layers == "last":
        pairs = [Pair(n_student, n_teacher, 1.0)]
    else:
        if not fcfg.layers:
            raise ConfigError("features.layers: an explicit list needs at least one pair")
        pairs = [
            Pair(
                _index(p.student, n_student, f"features.layers[{k}].student", "student"),
                _index(p.teacher, n_teacher, f"features.layers[{k}].teacher", "teacher"),
                p.weight,
            )
            for k, p in enumerate(fcfg.layers)
        ]
        pairs = [p for p in pairs if p.weight > 0]  # a weight-0 pair has nothing to train
        if not pairs:
            raise ConfigError("features.layers: every pair has weight 0")
    if fcfg.embeddings and all(p.student != 0 for p in pairs):
        pairs = [Pair(0, 0, 1.0), *pairs]
    return pairs


def _projector(kind: str, d_in: int, d_out: int, bias: bool, hidden: int | None) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_in, d_out, bias=bias)
    width = hidden or d_out
    return nn.Sequential(nn.Linear(d_in, width, bias=bias), nn.GELU(), nn.Linear(width, d_out, bias=bias))


class FeatureProjectors(nn.Module):
    """One projector per layer pair: student width -> teacher width."""

    def __init__(self, pairs: list[Pair], d_student: int, d_teacher: int, fcfg: FeatureConfig):
        super().__init__()
        self.pairs = pairs
        self.spec = {
            "pairs": [pair_record(p) for p in pairs],
            "d_student": d_student,
            "d_teacher": d_teacher,
            "projector": fcfg.projector,
            "bias": fcfg.projector_bias,
            "mlp_hidden": fcfg.mlp_hidden,
            "loss": fcfg.loss,
        }
        self.projs = nn.ModuleList(
            _projector(fcfg.projector, d_student, d_teacher, fcfg.projector_bias, fcfg.mlp_hidden) for _ in pairs
        )

    def forward(self, student_states: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """The projected student state of every pair, (..., d_teacher) each."""
        return [proj(student_states[p.student]) for p, proj in zip(self.pairs, self.projs)]


def feature_term_sum(
    projectors: nn.Module,
    pairs: list[Pair],
    loss_name: str,
    student_states: tuple[torch.Tensor, ...],
    teacher_states: tuple[torch.Tensor, ...],
    mask: torch.Tensor,
) -> torch.Tensor:
    """sum_p w_p * feature_loss(P_p(h_s), h_t) / sum_p w_p, a sum over the masked tokens.

    Args:
        projectors: `FeatureProjectors` (or its DDP / FSDP wrapper), one projector per pair.
        pairs: its layer pairs; loss_name: a name in `distill.loss.token_losses.FEATURE_LOSSES`.
        student_states, teacher_states: the models' hidden_states tuples, (B, T, D) each.
        mask: (B, T) bool; positions that count.
    """
    total = 0.0
    for p, h in zip(pairs, projectors(student_states)):
        total = total + p.weight * feature_loss(loss_name, h, teacher_states[p.teacher], mask)
    return total / sum(p.weight for p in pairs)


def build_projectors(fcfg: FeatureConfig, pairs: list[Pair] | None, student, teacher) -> FeatureProjectors | None:
    """The run's projectors (seeded by the caller), or None without a feature term."""
    if fcfg.weight == 0 or pairs is None:
        return None
    return FeatureProjectors(pairs, hidden_size(student), hidden_size(teacher), fcfg)


def export_projectors(projectors: FeatureProjectors, state: dict[str, torch.Tensor], run_dir: Path) -> None:
    """RUN/projectors/: projectors.safetensors + projectors.json (pairs, widths, kind, loss)."""
    with atomic_folder(Path(run_dir) / rundir.PROJECTORS) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / "projectors.safetensors"))
        (tmp / "projectors.json").write_text(json.dumps(projectors.spec, indent=2))


def load_projectors(run_dir: str | Path) -> FeatureProjectors:
    """Rebuild the exported projectors of a run directory."""
    folder = Path(run_dir) / rundir.PROJECTORS
    spec = json.loads((folder / "projectors.json").read_text())
    fcfg = FeatureConfig(
        weight=1.0, projector=spec["projector"], projector_bias=spec["bias"], mlp_hidden=spec["mlp_hidden"], loss=spec["loss"]
    )
    pairs = [Pair(p["student"], p["teacher"], p["weight"]) for p in spec["pairs"]]
    projectors = FeatureProjectors(pairs, spec["d_student"], spec["d_teacher"], fcfg)
    projectors.load_state_dict(load_file(str(folder / "projectors.safetensors")))
    return projectors
