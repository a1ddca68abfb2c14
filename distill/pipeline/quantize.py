"""`distill quantize RUN_OR_MODEL --scheme int8|int4`: post-training quantization of a
student (or of any model `load_causal_lm` reads) into a quantized folder, and the same step
at the end of a run with a `quant` section (`models.quantized_io.quantize_folder`)."""

from __future__ import annotations

from pathlib import Path

from distill import rundir
from distill.config import load_config
from distill.errors import DistillError
from distill.models.quantize import Scheme
from distill.models.quantized_io import quantize_folder


def is_run_dir(path: Path) -> bool:
    return (path / rundir.CONFIG).is_file() and (path / rundir.STUDENT / "config.json").is_file()


def run_quantize(path: str, scheme: str, group_size: int | None, activations: bool | None, out: str | None) -> dict:
    """The command: a run directory's student/ -> RUN/student-<scheme>/ (the run's `quant`
    section gives the group size, activations and exclusions unless the options do); a model
    folder -> FOLDER-<scheme>/ beside it; anything else (hub id, .gguf, packaged alias) needs --out."""
    p = Path(path)
    run_dir = p if p.is_dir() and is_run_dir(p) else None
    q = load_config(p / rundir.CONFIG).quant if run_dir is not None else None
    defaults = q if q is not None and q.scheme is not None else None
    settings = Scheme(
        scheme,
        group_size if group_size is not None else (defaults.group_size if defaults else 32),
        activations if activations is not None else (defaults.activations if defaults else False),
        tuple(defaults.exclude) if defaults else ("lm_head",),
    )
    if out is not None:
        target = Path(out)
    elif run_dir is not None:
        target = run_dir / rundir.quantized_student(scheme)
    elif p.is_dir():
        target = p.parent / f"{p.name}-{scheme}"
    else:
        raise DistillError(f"{path} is not a run or model folder: give --out DIR for the quantized model")
    source = run_dir / rundir.STUDENT if run_dir is not None else path
    return quantize_folder(source, target, settings, run_dir)
