"""A quantized model folder: safetensors and JSON only, no pickle.

    OUT/config.json, generation_config.json, tokenizer files   as save_pretrained writes them
    OUT/quantized.safetensors  the full-precision tensors under their usual names, and per
                            quantized linear layer NAME: NAME.weight.qdata (int8; int4 two
                            values per byte), NAME.weight.scale, NAME.weight.zero_point
    OUT/quant.json          format, scheme, bits, group size, activations, the quantized
                            layers, tied names, sizes on disk, torchao version (written last)

`load_quantized(OUT)` (or `load_causal_lm(OUT)`, which dispatches on quant.json) builds the
model from config.json and puts torchao's IntxUnpackedToInt8Tensor back into each listed
layer from its plain components; everything read is checked, and a misfit is one line
naming the file and the tensor. transformers' own torchao serialization pickles the
tensor subclasses (or goes through a prototype API), which distill refuses elsewhere too.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from distill import rundir
from distill.budget import record_phase
from distill.errors import DistillError
from distill.models.loading import count_parameters, load_causal_lm, load_tokenizer
from distill.models.quantize import BITS, Scheme, quantize_model, torchao
from distill.paths import atomic_folder, atomic_write_json, read_json

FORMAT = "distill-quantized"
VERSION = 1
WEIGHTS = "quantized.safetensors"  # not model.safetensors: plain from_pretrained must not half-load it
_PARTS = ("qdata", "scale", "zero_point")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7] -> uint8, two per byte (low nibble first), flattened."""
    flat = (q.reshape(-1).to(torch.int16) + 8).to(torch.uint8)  # (n,) in 0..15
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)  # (ceil(n / 2),)


def unpack_int4(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of `pack_int4`: int8 values in [-8, 7] of `shape`."""
    n = int(torch.Size(shape).numel())
    both = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:n]  # (n,)
    return (both.to(torch.int16) - 8).to(torch.int8).reshape(shape)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def is_quantized_folder(path: str | Path) -> bool:
    return (Path(path) / rundir.QUANT).is_file()


def _plain_tensors(model: PreTrainedModel, names: list[str]) -> tuple[dict, list[str]]:
    """The full-precision tensors to store (each storage once) and the names left out as
    ties of an earlier one (lm_head = embeddings)."""
    quantized = {f"{n}.weight" for n in names}
    tensors, seen, tied = {}, {}, []
    for key, value in model.state_dict().items():
        if key in quantized:
            continue
        ptr = value.data_ptr()
        if ptr in seen and value.numel() > 0:
            tied.append(key)
            continue
        seen[ptr] = key
        tensors[key] = value.detach().contiguous()
    return tensors, tied


def save_quantized(model: PreTrainedModel, tokenizer, scheme: Scheme, names: list[str], out: Path, extra: dict) -> dict:
    """Write the quantized `model` (its layers `names` quantized by `scheme`) and `tokenizer`
    to `out`, whole or not at all; returns the quant.json record (with `extra` in it)."""
    tensors, tied = _plain_tensors(model, names)
    modules = dict(model.named_modules())
    for name in names:
        w = modules[name].weight
        q = w.qdata if scheme.name == "int8" else pack_int4(w.qdata)
        tensors.update({f"{name}.weight.qdata": q.contiguous(), f"{name}.weight.scale": w.scale.contiguous(),
                        f"{name}.weight.zero_point": w.zero_point.contiguous()})
    with atomic_folder(Path(out)) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        record = {"format": FORMAT, "version": VERSION, **scheme.record(), "modules": names, "tied": tied,
                  "torchao": torchao().__version__, "weights_bytes": (tmp / WEIGHTS).stat().st_size, **extra}
        record["folder_bytes"] = folder_bytes(tmp)
        atomic_write_json(tmp / rundir.QUANT, record)
    return record


def read_record(folder: Path) -> tuple[dict, Scheme]:
    """quant.json of `folder`, checked field by field, and its Scheme."""
    path = Path(folder) / rundir.QUANT
    record = read_json(path, "quantization record")
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise DistillError(f"{path}: not a distill quantization record (format {FORMAT!r} expected)")
    if record.get("version") != VERSION:
        raise DistillError(f"{path}: format version {record.get('version')!r}; this distill reads version {VERSION}")
    if record.get("scheme") not in BITS:
        raise DistillError(f"{path}: unsupported scheme {record.get('scheme')!r}; known: {', '.join(BITS)}")
    for key in ("modules", "tied", "exclude"):
        if not isinstance(record.get(key), list) or not all(isinstance(n, str) for n in record[key]):
            raise DistillError(f"{path}: {key!r} must be a list of names")
    group = record.get("group_size")
    if record["scheme"] == "int4" and (not isinstance(group, int) or isinstance(group, bool) or group < 2):
        raise DistillError(f"{path}: int4 needs an integer group_size >= 2, got {group!r}")
    if not isinstance(record.get("activations"), bool):
        raise DistillError(f"{path}: 'activations' must be true or false")
    scheme = Scheme(record["scheme"], group if record["scheme"] == "int4" else 32, record["activations"], tuple(record["exclude"]))
    return record, scheme


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DistillError(f"could not read {path}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None


def _expect(path: Path, key: str, t: torch.Tensor | None, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    if t is None:
        raise DistillError(f"{path}: tensor {key} is missing")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise DistillError(f"{path}: tensor {key} is {t.dtype} {tuple(t.shape)}, expected {dtype} {tuple(shape)}")
    return t


def _quantized_weight(path: Path, tensors: dict, name: str, linear: torch.nn.Linear, scheme: Scheme):
    """The IntxUnpackedToInt8Tensor of layer `name`, rebuilt from its stored components."""
    ao = torchao().quantization
    out_f, in_f = linear.out_features, linear.in_features
    block = scheme.block(in_f)
    if in_f % block:
        raise DistillError(f"{path}: {name} input size {in_f} is not a multiple of group_size {block}")
    key = f"{name}.weight."
    blocks = (out_f, in_f // block)
    if scheme.name == "int8":
        qdata = _expect(path, key + "qdata", tensors.pop(key + "qdata", None), (out_f, in_f), torch.int8)
    else:
        packed = _expect(path, key + "qdata", tensors.pop(key + "qdata", None), ((out_f * in_f + 1) // 2,), torch.uint8)
        qdata = unpack_int4(packed, (out_f, in_f))
    scale = tensors.pop(key + "scale", None)
    if scale is None or not scale.is_floating_point():
        raise DistillError(f"{path}: tensor {key}scale is missing or not floating point")
    scale = _expect(path, key + "scale", scale, blocks, scale.dtype)
    zero = _expect(path, key + "zero_point", tensors.pop(key + "zero_point", None), blocks, torch.int8)
    if not torch.isfinite(scale).all():
        raise DistillError(f"{path}: tensor {key}scale holds NaN or infinity")
    act = None
    if scheme.activations:
        from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
            IntxUnpackedToInt8TensorActivationQuantization as Act,
        )

        act = Act.INT8_ASYM_PER_TOKEN
    dtype = torch.int8 if scheme.name == "int8" else torch.int4
    return ao.IntxUnpackedToInt8Tensor(qdata, scale, zero, dtype, [1, block], linear.weight.dtype, act)


def load_quantized(folder: str | Path) -> PreTrainedModel:
    """The model a quantized folder holds, in eval mode, its layers quantized as stored.
    `model.distill_quant` is the folder's quant.json record."""
    folder = Path(folder)
    record, scheme = read_record(folder)
    path = folder / WEIGHTS
    tensors = _load_tensors(path)
    try:
        config = AutoConfig.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DistillError(f"could not build the model of {folder / 'config.json'}: {str(exc).strip().splitlines()[0]}") from None
    modules = dict(model.named_modules())
    quantized = {}
    for name in record["modules"]:
        if not isinstance(modules.get(name), torch.nn.Linear):
            raise DistillError(f"{folder / rundir.QUANT}: {name!r} is not a linear layer of the model in config.json")
        quantized[name] = _quantized_weight(path, tensors, name, modules[name], scheme)
    state = model.state_dict()
    expected = set(state) - {f"{n}.weight" for n in record["modules"]} - set(record["tied"])
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        what = f"tensor {missing[0]} is missing" if missing else f"unexpected tensor {extra[0]}"
        raise DistillError(f"{path}: {what}")
    for key, value in tensors.items():
        _expect(path, key, value, tuple(state[key].shape), state[key].dtype)
    model.load_state_dict(tensors, strict=False)
    for key in record["tied"]:  # a tie the fresh model does not make would leave random weights
        owner = next((k for k, v in model.state_dict().items() if k != key and v.data_ptr() == state[key].data_ptr()), None)
        if owner is None or owner in record["tied"]:
            raise DistillError(f"{folder / rundir.QUANT}: {key} is listed as tied, but the model built from config.json does not tie it")
    for name, weight in quantized.items():
        modules[name].weight = torch.nn.Parameter(weight, requires_grad=False)
    model.requires_grad_(False)
    model.distill_quant = record
    return model.eval()


def quantize_folder(source: str | Path, out: Path, scheme: Scheme, run_dir: Path | None = None) -> dict:
    """Quantize the model at `source` by `scheme` into the folder `out` (replaced whole when it
    is an earlier quantized folder; any other existing path is refused). In a run directory,
    the seconds go to budget.json's quantization phase. Returns the quant.json record."""
    out = Path(out)
    if out.exists() and not is_quantized_folder(out):
        raise DistillError(f"--out {out} exists and is not a quantized model folder; choose a new path")
    if is_quantized_folder(source):
        raise DistillError(f"{source} is already quantized ({rundir.QUANT}); quantize the full-precision model")
    torchao()  # the missing-package error before the model is loaded
    t0 = time.perf_counter()
    model = load_causal_lm(name=str(source))
    tokenizer = load_tokenizer(str(source))
    state = model.state_dict()
    # Every stored tensor once (tied ones share storage): what the full-precision folder holds.
    fp_bytes = sum({t.data_ptr(): t.numel() * t.element_size() for t in state.values()}.values())
    names = quantize_model(model, scheme)
    params = sum(model.get_submodule(n).weight.numel() for n in names)
    extra = {"source": str(source), "fp_weights_bytes": fp_bytes, "quantized_params": params,
             "params": count_parameters(model)}
    record = save_quantized(model, tokenizer, scheme, names, out, extra)
    seconds = time.perf_counter() - t0
    if run_dir is not None:
        # No matmul: a few elementwise operations per weight, counted as 0 FLOPs and 0 tokens.
        usage = {"seconds": seconds, "tokens": 0, "flops": 0.0, "quantized_params": params}
        record_phase(Path(run_dir) / rundir.BUDGET, "quantization", add=usage)
    return {**record, "out": str(out), "seconds": seconds}
