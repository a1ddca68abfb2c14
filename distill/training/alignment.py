"""How far the student's representations are from the teacher's, on a fixed probe set.

Linear CKA (Kornblith et al. 2019) between teacher states and student states (raw, and
projected when the run trains projectors) for each layer pair, on the same held-out
tokens at every probe. Each probe appends a record to RUN/alignment.jsonl; at step 0 and
at each checkpoint the states themselves are saved under RUN/latents/ for the visualiser:

    latents/probe.json              tokens: example, position, id, completion flag; pairs
    latents/teacher.safetensors     teacher.<t>: (N, D_t) fp16 (fp32 if it overflows) per paired teacher index
    latents/step-NNNNNN.safetensors student.<s>: (N, D_s); projected.<k>: (N, D_t) per pair k
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from distill import rundir
from distill.data.rows import Example, collate
from distill.models.last_position import last_position
from distill.paths import atomic_write_json, finish_file
from distill.training.features import Pair, pair_record


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of (n, d1) and (n, d2) representations of the same n inputs, in [0, 1].

    ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on column-centred X, Y (float64); invariant
    to orthogonal maps and isotropic scaling of either side, not to arbitrary linear maps.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: need (n, d1) and (n, d2), got {tuple(x.shape)} and {tuple(y.shape)}")
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = (y.T @ x).pow(2).sum()
    denom = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / denom) if denom > 0 else 0.0


class Probe:
    """A fixed batch of held-out examples and the mask of the tokens that are probed."""

    def __init__(self, examples: list[Example], pad_id: int, max_tokens: int, skip_first: bool):
        chosen, total = [], 0
        for ex in examples:
            n = len(ex.input_ids)
            if chosen and total + n > max_tokens:
                break
            chosen.append(ex)
            total += n
        batch = collate(chosen, pad_id)
        self.input_ids, self.attention_mask = batch["input_ids"], batch["attention_mask"]
        self.mask = self.attention_mask.bool()  # (B, T): the real tokens (right padding) ...
        if skip_first:
            self.mask[:, 0] = False  # ... but the first (see FeatureConfig.skip_first_token)
        example, position = self.mask.nonzero(as_tuple=True)
        self.tokens = {
            "example": example.tolist(),
            "position": position.tolist(),
            "token_id": self.input_ids[self.mask].tolist(),
            "completion": (batch["labels"][self.mask] != -100).tolist(),
        }

    @torch.no_grad()
    def states(self, model, indices: set[int]) -> dict[int, torch.Tensor]:
        """(N, D) fp32 states of the probed tokens at the given hidden_states indices."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        input_ids = self.input_ids.to(device)
        out = model(
            input_ids=input_ids,
            attention_mask=self.attention_mask.to(device),
            output_hidden_states=True,
            logits_to_keep=last_position(input_ids),  # on the model's device
        )
        model.train(was_training)
        mask = self.mask.to(device)
        return {i: out.hidden_states[i][mask].float().cpu() for i in sorted(indices)}


class AlignmentProbe:
    """CKA per layer pair at each probe; latent snapshots on request."""

    def __init__(self, probe: Probe, pairs: list[Pair], teacher, run_dir: Path, write: bool):
        self.probe, self.pairs, self.run_dir, self.write = probe, pairs, run_dir, write
        self.teacher_states = probe.states(teacher, {p.teacher for p in pairs})
        if write:
            latents = run_dir / rundir.LATENTS
            latents.mkdir(parents=True, exist_ok=True)
            meta = {"tokens": probe.tokens, "pairs": [pair_record(p) for p in pairs]}
            atomic_write_json(latents / "probe.json", meta)
            _save(latents / "teacher.safetensors", {f"teacher.{i}": s for i, s in self.teacher_states.items()})

    @torch.no_grad()
    def __call__(self, step: int, student, projectors, snapshot: bool) -> dict:
        """Probe the student at `step`: append to alignment.jsonl; save its latents if asked."""
        states = self.probe.states(student, {p.student for p in self.pairs})
        projected = None
        if projectors is not None:  # through the (DDP / FSDP) wrapper: every rank calls it
            device = next(projectors.parameters()).device
            projected = [h.float().cpu() for h in projectors({i: s.to(device) for i, s in states.items()})]
        rows = []
        for k, p in enumerate(self.pairs):
            row = {**pair_record(p), "cka": linear_cka(states[p.student], self.teacher_states[p.teacher])}
            if projected is not None:
                row["cka_projected"] = linear_cka(projected[k], self.teacher_states[p.teacher])
            rows.append(row)
        record = {"step": step, "tokens": len(self.probe.tokens["token_id"]), "pairs": rows}
        record["cka_mean"] = sum(r["cka"] for r in rows) / len(rows)
        if projected is not None:
            record["cka_projected_mean"] = sum(r["cka_projected"] for r in rows) / len(rows)
        if self.write:
            with open(self.run_dir / rundir.ALIGNMENT, "a") as f:  # trimmed on resume, like metrics.jsonl
                f.write(json.dumps(record) + "\n")
            if snapshot:
                tensors = {f"student.{i}": s for i, s in states.items()}
                tensors |= {f"projected.{k}": h for k, h in enumerate(projected or [])}
                _save(self.run_dir / rundir.LATENTS / f"{rundir.step_name(step)}.safetensors", tensors)
        return record


def _compact(t: torch.Tensor) -> torch.Tensor:
    """fp16 when every value fits (|x| < 6e4), else fp32: outlier activations stay finite."""
    t = t.detach().cpu().contiguous()
    return t.to(torch.float16) if t.abs().max() < 6e4 else t.float()


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: _compact(v) for k, v in tensors.items()}, str(tmp))
    finish_file(tmp)  # the umask's mode (safetensors writes 0600), on disk before the rename
    tmp.replace(path)
