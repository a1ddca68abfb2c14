"""The latent page: students' hidden states in the frozen teacher's space, step by step.

`write_latent_page(run_dirs, out)` reads each run's latent snapshots (RUN/latents/, written
by the alignment probe at step 0 and at each checkpoint) and writes one self-contained HTML
page (plotly.js inline, the data as JSON in the page, no network):

- one layer pair (default: the last pair of the first run; `pair` picks another index);
- ONE 2-D basis for the page: the top-2 principal directions of the teacher's centred
  states of that pair (SVD; each direction's sign fixed so its largest loading is positive);
- each run's student states in the teacher's space at each snapshot: `projected.<k>` (the
  run's own learned projector) when the run trained projectors (feature KD); otherwise
  (logit-only runs, another width) a ridge least-squares map from the centred student
  states to the centred teacher states, fitted at that step on the probe tokens themselves
  (lambda = RIDGE * mean squared singular value of the student states); both are then
  projected into the page's basis. The map is the best linear read-out of the student and
  so flatters it: what is still off on the plot is geometry no linear map repairs;
- linear CKA per step (`distill.training.alignment.linear_cka`) between the teacher states and the
  states the run offers: the projected states for feature KD, the raw student states for a
  logit-only run (the ridge map is fitted on the probe itself, so its CKA would be inflated);
- a class per probe token (see `token_classes`), a fixed-seed subsample of at most
  MAX_POINTS tokens, the same tokens for every run and step.

`simulate=True` draws the chapter's toy version instead (distill/report/latent_sim.py).
"""

import math
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer

from distill import rundir
from distill.errors import DistillError
from distill.paths import atomic_write_text, read_json
from distill.report.latent_page import render
from distill.report.latent_sim import simulated
from distill.report.run_states import RunStates
from distill.training.alignment import linear_cka

MAX_POINTS = 1500  # plotted tokens at most (fixed-seed subsample)
MAX_LINKS = 150  # student -> teacher lines drawn for this many plotted tokens, evenly spread
RIDGE = 1e-3  # ridge lambda, relative to the mean squared singular value of the student states
SEED = 0
DIGITS = [str(d) for d in range(10)]


# ---------------------------------------------------------------- math


def pca_basis(teacher: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean (D,), basis (D, 2) orthonormal, explained variance ratio (2,)) of (N, D) states:
    the top-2 principal directions of the centred states, each signed so that its largest
    absolute loading is positive (deterministic)."""
    x = np.asarray(teacher, dtype=np.float64)
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    basis = np.zeros((x.shape[1], 2))
    k = min(2, vt.shape[0])
    basis[:, :k] = vt[:k].T
    for j in range(k):
        if basis[np.abs(basis[:, j]).argmax(), j] < 0:
            basis[:, j] *= -1
    var = s**2
    ratio = np.zeros(2)
    ratio[:k] = var[:k] / var.sum() if var.sum() > 0 else 0.0
    return mean, basis, ratio


def project(states: np.ndarray, mean: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """(N, D) states in teacher space -> (N, 2) page coordinates."""
    return (np.asarray(states, dtype=np.float64) - mean) @ basis


def ridge_map(student: np.ndarray, teacher: np.ndarray, lam: float = RIDGE) -> tuple[np.ndarray, float]:
    """Least-squares linear map (with intercept) from (N, D_s) student to (N, D_t) teacher
    states, ridge lambda = lam * mean squared singular value of the centred student states.
    Returns (the mapped student states (N, D_t), R^2 of the fit)."""
    s = np.asarray(student, dtype=np.float64)
    t = np.asarray(teacher, dtype=np.float64)
    sc, tc = s - s.mean(0), t - t.mean(0)
    gram = sc.T @ sc
    reg = lam * np.trace(gram) / max(1, min(sc.shape)) + 1e-12
    w = np.linalg.solve(gram + reg * np.eye(gram.shape[0]), sc.T @ tc)
    fitted = sc @ w
    total = float((tc**2).sum())
    r2 = 1.0 - float(((tc - fitted) ** 2).sum()) / total if total > 0 else 0.0
    return fitted + t.mean(0), r2


def cka(a: np.ndarray, b: np.ndarray) -> float:
    return linear_cka(torch.from_numpy(np.asarray(a, dtype=np.float64)), torch.from_numpy(np.asarray(b, dtype=np.float64)))


def subsample(n: int, cap: int = MAX_POINTS, seed: int = SEED) -> np.ndarray:
    """Sorted indices of at most `cap` of n points, the same for a given (n, cap, seed)."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))


# ---------------------------------------------------------------- classes


def _clean(text: str) -> str:
    return text.replace("\u0120", " ").replace("\u2581", " ").strip()


def token_classes(tokens: dict, vocab: dict[int, str] | None) -> list[str]:
    """A class per probe token: its NEXT token in the same probe example (what the state
    has to predict). Digit classes "0".."9" when the next token is a digit (the built-in
    chain task: operands, running values and the answer), "symbol" for any other next token,
    "end" for an example's last probed token. Probes where fewer than a quarter of the next
    tokens are digits (another task or tokenizer) instead use the 9 most frequent next-token
    texts, then "other" and "end"."""
    at = {(e, p): t for e, p, t in zip(tokens["example"], tokens["position"], tokens["token_id"])}
    nxt = [at.get((e, p + 1)) for e, p in zip(tokens["example"], tokens["position"])]
    text = [None if t is None else _clean(vocab.get(t, f"id {t}")) if vocab else f"id {t}" for t in nxt]
    digits = [t is not None and len(t) == 1 and t.isdigit() for t in text]
    if text and sum(digits) >= 0.25 * len(text):
        return ["end" if t is None else t if d else "symbol" for t, d in zip(text, digits)]
    counts: dict[str, int] = {}
    for t in text:
        if t is not None:
            counts[t] = counts.get(t, 0) + 1
    top = set(sorted(counts, key=lambda t: (-counts[t], t))[:9])
    return ["end" if t is None else t if t in top else "other" for t in text]


def class_order(names: list[str]) -> list[str]:
    rest = sorted(set(names) - set(DIGITS) - {"symbol", "other", "end"})
    return [c for c in DIGITS if c in names] + rest + [c for c in ("symbol", "other", "end") if c in names]


# ---------------------------------------------------------------- runs on disk


def _vocab(run: Path) -> dict[int, str] | None:
    """id -> token text from the run's exported tokenizer (RUN/student/tokenizer.json)."""
    path = run / rundir.STUDENT / "tokenizer.json"
    if not path.is_file():
        return None
    tok = Tokenizer.from_file(str(path))
    return {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return {k: v.float().numpy() for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DistillError(f"{path}: unreadable latent snapshot ({why})") from None


def _damaged(run: Path, e: Exception) -> DistillError:
    """A probe record or snapshot without the entries the probe writes: one line, no traceback."""
    return DistillError(f"{run}: latents/ is damaged ({type(e).__name__}: {e}); the page cannot read it")


def read_run(run: Path, pair: dict) -> tuple[RunStates, dict, np.ndarray]:
    """(the run's states of `pair`, its probe.json, its teacher states of the pair)."""
    latents = run / rundir.LATENTS
    steps = sorted(latents.glob("step-*.safetensors")) if latents.is_dir() else []
    if not (latents / "probe.json").is_file() or not (latents / "teacher.safetensors").is_file() or not steps:
        raise DistillError(
            f"{run}: no latent snapshots (latents/ with probe.json, teacher.safetensors and step-*.safetensors); "
            "the latent page needs a run trained with a teacher model and features.probe_examples > 0"
        )
    meta = read_json(latents / "probe.json", "latent probe record")
    wanted = (pair["student"], pair["teacher"])
    try:
        k = next((i for i, p in enumerate(meta["pairs"]) if (p["student"], p["teacher"]) == wanted), None)
    except (KeyError, TypeError) as e:
        raise _damaged(run, e) from None
    if k is None:
        layers = f"student layer {pair['student_layer']} <-> teacher layer {pair['teacher_layer']}"
        raise DistillError(f"{run}: its probe has no layer pair {layers}")
    try:
        teacher = _load_safetensors(latents / "teacher.safetensors")[f"teacher.{pair['teacher']}"]
        snaps = [_load_safetensors(p) for p in steps]
        feature = f"projected.{k}" in snaps[0]
        states = [s[f"projected.{k}"] if feature else s[f"student.{pair['student']}"] for s in snaps]
        step_numbers = [int(p.stem.split("-")[1]) for p in steps]
    except (KeyError, ValueError, IndexError) as e:
        raise _damaged(run, e) from None
    if not np.isfinite(teacher).all():
        raise DistillError(f"{run}: the teacher's latent states hold NaN or inf; the page cannot place them")
    for step, x in zip(step_numbers, states):
        if not np.isfinite(x).all():
            raise DistillError(f"{run}: the student's latent states at step {step} hold NaN or inf (a diverged run?)")
    return RunStates(run.name, feature, step_numbers, states), meta, teacher


def read_runs(run_dirs: list[Path], pair: int | None) -> tuple[list[RunStates], np.ndarray, list[str], dict]:
    """Every run's states, the shared teacher states, the token classes and the pair record."""
    if not run_dirs:
        raise DistillError("distill latents: give at least one run directory (or --simulate)")
    first = Path(run_dirs[0]) / rundir.LATENTS / "probe.json"
    if not first.is_file():
        read_run(Path(run_dirs[0]), {})  # raises the missing-latents error
    pairs = read_json(first, "latent probe record")
    if not isinstance(pairs, dict) or not isinstance(pairs.get("pairs"), list) or not pairs["pairs"]:
        raise DistillError(f"{first}: no layer pairs; the probe record is damaged")
    pairs = pairs["pairs"]
    index = len(pairs) - 1 if pair is None else pair
    if not 0 <= index < len(pairs):
        raise DistillError(f"--pair {pair}: the runs' probe has layer pairs 0..{len(pairs) - 1}")
    chosen = pairs[index]
    runs, teacher, meta0 = [], None, None
    for d in map(Path, run_dirs):
        run, meta, t = read_run(d, chosen)
        if teacher is None:
            teacher, meta0 = t, meta
        elif (
            meta["tokens"]["token_id"] != meta0["tokens"]["token_id"]
            or t.shape != teacher.shape
            or not np.allclose(t, teacher, rtol=1e-2, atol=1e-2)
        ):
            raise DistillError(
                f"{d}: probed on another teacher or other probe tokens than {run_dirs[0]}; "
                "the page compares runs of one teacher"
            )
        runs.append(run)
    names = [r.name for r in runs]
    for r, d in zip(runs, map(Path, run_dirs)):
        if names.count(r.name) > 1:
            r.name = f"{d.parent.name}/{d.name}"
    classes = token_classes(meta0["tokens"], _vocab(Path(run_dirs[0])))
    return runs, teacher, classes, chosen


# ---------------------------------------------------------------- page data


def _rounded(a: np.ndarray, scale: float) -> list:
    decimals = max(0, 4 - int(math.floor(math.log10(scale)))) if scale > 0 else 4
    return np.round(a, decimals).tolist()


def page_data(runs: list[RunStates], teacher: np.ndarray, classes: list[str], meta: dict) -> dict:
    """Everything the page draws, computed here: coordinates, CKA, fit quality."""
    mean, basis, ratio = pca_basis(teacher)
    idx = subsample(len(teacher))
    order = class_order(classes)
    cls = [order.index(classes[i]) for i in idx]
    t_xy = project(teacher[idx], mean, basis)
    series, all_xy = [], [t_xy]
    for r in runs:
        xy, ckas, fits = [], [], []
        for s in r.states:
            mapped, r2 = (s, None) if r.feature else ridge_map(s, teacher)
            p = project(mapped[idx], mean, basis)
            xy.append(p)
            all_xy.append(p)
            ckas.append(round(cka(s, teacher), 4))
            fits.append(None if r2 is None else round(r2, 4))
        series.append((r, xy, ckas, fits))
    pts = np.concatenate(all_xy)
    lo, hi = np.quantile(pts, 0.005, axis=0), np.quantile(pts, 0.995, axis=0)
    lo, hi = np.minimum(lo, t_xy.min(0)), np.maximum(hi, t_xy.max(0))
    pad = 0.06 * np.maximum(hi - lo, 1e-9)
    links = sorted({int(round(v)) for v in np.linspace(0, len(idx) - 1, min(MAX_LINKS, len(idx)))})
    scale = float(np.abs(pts).max()) or 1.0
    out_runs = []
    for r, xy, ckas, fits in series:
        kind = "feature KD" if r.feature else "logit-only"
        out_runs.append({
            "name": r.name, "kind": kind, "label": f"{kind} ({r.name})",
            "method": "its learned projector" if r.feature else "a ridge least-squares map fitted at this step",
            "steps": r.steps, "cka": ckas, "fit_r2": fits,
            "x": [_rounded(p[:, 0], scale) for p in xy], "y": [_rounded(p[:, 1], scale) for p in xy],
        })  # fmt: skip
    return {
        **meta,
        "classes": order, "cls": cls, "index": idx.tolist(), "n_tokens": len(teacher), "links": links,
        "explained": [round(float(v), 4) for v in ratio],
        "teacher": {"x": _rounded(t_xy[:, 0], scale), "y": _rounded(t_xy[:, 1], scale)},
        "range": {a: [float(lo[j] - pad[j]), float(hi[j] + pad[j])] for j, a in enumerate("xy")},
        "runs": out_runs, "ridge": RIDGE, "max_points": MAX_POINTS,
    }  # fmt: skip


def write_latent_page(run_dirs: list[Path], out: Path, simulate: bool = False, pair: int | None = None) -> Path:
    """Write the latent page comparing the runs' students with their frozen teacher (or, with
    `simulate`, the toy simulation; run_dirs and pair are then ignored). Returns `out`."""
    if simulate:
        runs, teacher, classes, meta = simulated()
    else:
        runs, teacher, classes, chosen = read_runs(list(run_dirs), pair)
        meta = {
            "simulated": False,
            "title": "Students in the teacher's latent space",
            "pair": f"student layer {chosen['student_layer']} \u2194 teacher layer {chosen['teacher_layer']} "
            f"(hidden_states {chosen['student']} \u2194 {chosen['teacher']})",
            "class_rule": "the next token of the probe example (digits 0-9; any other token: symbol; last token: end)"
            if set(classes) <= set(DIGITS) | {"symbol", "end"}
            else "the next token of the probe example (the 9 most frequent; the rest: other; last token: end)",
        }
    out = Path(out)
    atomic_write_text(out, render(page_data(runs, teacher, classes, meta)))
    return out
