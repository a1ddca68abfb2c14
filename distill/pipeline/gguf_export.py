"""`distill export RUN_OR_MODEL --gguf f16|q8_0`: a student as one GGUF file for llama.cpp.

    distill export runs/kd --gguf q8_0            -> runs/kd/student-q8_0.gguf
    distill export students/smol-10 --gguf f16    -> students/smol-10-f16.gguf

Families: llama (SmolLM2; llama-shaped models with a byte-level BPE tokenizer) and qwen2.
Each is a `Family` record: its llama.cpp architecture, whether the query and key rows are
permuted, and which biases it may carry. HF's llama rotates each head's dimension i with
i + d/2 (rotate_half); llama.cpp's llama graph rotates adjacent pairs (2i, 2i + 1), so its
converter reorders the rows of q and k per head to make the two agree, and GGUF readers
(transformers' among them) undo that. Qwen2 runs in llama.cpp with HF's own pairing, so its
rows are not reordered. Tensor names come from the gguf package's name map; the metadata is
the config's (context length, width, depth, heads, key-value heads, head size, rope base,
RMS-norm epsilon, vocabulary) and the tokenizer's (`gguf_vocab.py`).

Schemes: f16 writes every matrix as float16; q8_0 as llama.cpp's Q8_0 blocks (32
weights, one float16 scale), quantized by the gguf package; a matrix whose rows are not a
multiple of 32 stays float16 there. One-dimensional tensors (norms, biases) stay float32,
as llama.cpp expects. The file is written beside its final name and renamed into place:
a failure leaves no file.
"""

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from distill import rundir
from distill.errors import DistillError
from distill.models.loading import count_parameters, load_causal_lm, load_tokenizer
from distill.paths import finish_file, fsync_path, read_json
from distill.pipeline.gguf_vocab import gguf_vocab, write_vocab

SCHEMES = ("f16", "q8_0")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Family:
    """How one transformers model family becomes a llama.cpp architecture."""

    arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool  # llama.cpp's converter reorders q/k rows per head (llama does, qwen2 does not)
    biases: tuple[str, ...]  # projections that may carry a bias


FAMILIES = {
    "llama": Family("LLAMA", permute_qk=True, biases=()),
    "qwen2": Family("QWEN2", permute_qk=False, biases=("q_proj", "k_proj", "v_proj")),
}


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary row order -> llama.cpp's: per head, rows (0..d/2-1 | d/2..d-1) become
    interleaved pairs (0, d/2), (1, d/2+1), ...  w: (n_head * d, ...)."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def resolve_source(source: str | Path) -> tuple[Path, str]:
    """(model folder, default file stem) for a run directory or a save_pretrained folder."""
    path = Path(source)
    if (path / rundir.STUDENT / "config.json").is_file():
        return path / rundir.STUDENT, str(path / rundir.STUDENT)
    if (path / "config.json").is_file():
        return path, str(path).rstrip("/")
    if path.is_dir():
        raise DistillError(f"{path}: neither a run directory (with {rundir.STUDENT}/) nor a model folder (config.json)")
    raise DistillError(f"model or run directory not found: {path}")


def default_out(source: str | Path, scheme: str) -> Path:
    """RUN/student-<scheme>.gguf for a run, <folder>-<scheme>.gguf beside a model folder."""
    _, stem = resolve_source(source)
    return Path(f"{stem}-{scheme}.gguf")


def _rope_theta(text) -> float:
    params = getattr(text, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(text, "rope_theta", 10000.0)))


def check_family(config, where: str) -> Family:
    """The family record, or a one-line error for what the GGUF reader could not rebuild."""
    text = config.get_text_config()
    family = FAMILIES.get(config.model_type)
    if family is None:
        known = ", ".join(FAMILIES)
        raise DistillError(f"{where}: model_type {config.model_type!r} has no GGUF export (supported: {known})")
    params = getattr(text, "rope_parameters", None) or {}
    rope_type = params.get("rope_type") or (getattr(text, "rope_scaling", None) or {}).get("rope_type", "default")
    problems = {
        "rope scaling": rope_type != "default" and f"rope_type {rope_type!r}",
        "activation": getattr(text, "hidden_act", "silu") != "silu" and f"hidden_act {text.hidden_act!r}",
        "attention bias": config.model_type == "llama" and getattr(text, "attention_bias", False) and "attention_bias",
        "mlp bias": getattr(text, "mlp_bias", False) and "mlp_bias",
        "sliding window": getattr(text, "use_sliding_window", False) and "use_sliding_window",
    }
    for what, found in problems.items():
        if found:
            raise DistillError(f"{where}: {config.model_type} with {found} ({what}) has no GGUF export here")
    return family


def write_metadata(writer, model, name: str, scheme: str) -> None:
    """The architecture keys llama.cpp and transformers' GGUF loader read."""
    text = model.config.get_text_config()
    n_heads, n_kv = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // n_heads
    writer.add_name(name)
    writer.add_type("model")
    writer.add_context_length(text.max_position_embeddings)
    writer.add_embedding_length(text.hidden_size)
    writer.add_block_count(text.num_hidden_layers)
    writer.add_feed_forward_length(text.intermediate_size)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(_rope_theta(text))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * n_heads != text.hidden_size:  # llama.cpp assumes hidden / heads otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(text.rms_norm_eps)
    writer.add_vocab_size(model.get_input_embeddings().weight.shape[0])
    file_type = gguf.LlamaFileType.MOSTLY_F16 if scheme == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _encode(array: np.ndarray, scheme: str):
    """(data, raw ggml type or None) for one tensor in the scheme."""
    if array.ndim < 2:
        return array.astype(np.float32), None
    half = array.astype(np.float16)
    if scheme == "f16" or array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]:
        return half, None
    return gguf.quants.quantize(array.astype(np.float32), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def add_tensors(writer, model, family: Family, scheme: str, where: str) -> dict[str, int]:
    """Every weight under its GGUF name (q/k permuted for llama); counts per stored type."""
    text = model.config.get_text_config()
    n_heads, n_kv = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, family.arch), text.num_hidden_layers)
    tied = (
        model.get_output_embeddings() is not None
        and model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    )
    counts: dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and tensor.data_ptr() == model.get_input_embeddings().weight.data_ptr() and hf_name.startswith("lm_head"):
            continue  # a tied head is the embedding: llama.cpp reuses token_embd without output.weight
        if hf_name.endswith(".bias") and not any(f".{p}." in hf_name for p in family.biases):
            raise DistillError(f"{where}: tensor {hf_name}: {model.config.model_type} in llama.cpp has no such bias")
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise DistillError(f"{where}: tensor {hf_name} has no GGUF name in the {family.arch.lower()} layout")
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if not np.isfinite(array).all():
            raise DistillError(f"{where}: tensor {hf_name} holds NaN or infinite values")
        if family.permute_qk and ".attn_q." in gguf_name:
            array = permute_rows(array, n_heads)
        elif family.permute_qk and ".attn_k." in gguf_name:
            array = permute_rows(array, n_kv)
        data, raw = _encode(array, scheme)
        if raw is None and data.dtype == np.float16 and not np.isfinite(data).all():
            raise DistillError(f"{where}: tensor {hf_name} has values beyond float16's range; export --gguf q8_0 instead")
        writer.add_tensor(gguf_name, data, raw_dtype=raw)
        kind = raw.name if raw is not None else {np.float16: "F16", np.float32: "F32"}[data.dtype.type]
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _load(folder: Path):
    where = str(folder)
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise DistillError(
            f"{where}: no tokenizer (tokenizer.json); a GGUF file carries its tokenizer, so save one beside the model"
        )
    quantized = (read_json(folder / "config.json", "model config") or {}).get("quantization_config")
    if quantized:  # torchao / bitsandbytes tensors: the GGUF scheme does the quantizing
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else "?"
        raise DistillError(f"{where}: already quantized ({method}); export the unquantized student, --gguf q8_0 quantizes it")
    tokenizer = load_tokenizer(where)
    model = load_causal_lm(name=where)
    return model, tokenizer


def export_gguf(source: str | Path, scheme: str, out: str | Path | None = None) -> dict:
    """Write the student of a run (or a model folder) as one GGUF file; returns a summary.

    Raises:
        DistillError: an unknown scheme, an existing output, a missing or unreadable model
            or tokenizer, a family or setting the GGUF layout cannot express. Nothing is
            left behind on any failure.
    """
    if scheme not in SCHEMES:
        raise DistillError(f"--gguf {scheme!r}: choose one of {', '.join(SCHEMES)}")
    folder, _ = resolve_source(source)
    out = Path(out) if out is not None else default_out(source, scheme)
    if out.exists():
        raise DistillError(f"{out} already exists; pick another --out or delete it")
    if not out.parent.is_dir():
        raise DistillError(f"--out {out}: folder {out.parent} does not exist")
    model, tokenizer = _load(folder)
    family = check_family(model.config, str(folder))
    vocab = gguf_vocab(tokenizer, model.get_input_embeddings().weight.shape[0], str(folder))
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, family.arch)])
    try:
        write_metadata(writer, model, folder.name if folder.name != rundir.STUDENT else folder.parent.name, scheme)
        write_vocab(writer, vocab)
        counts = add_tensors(writer, model, family, scheme, str(folder))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        finish_file(Path(tmp))
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(out.parent)
    return {
        "out": str(out),
        "scheme": scheme,
        "architecture": gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, family.arch)],
        "source": str(folder),
        "params": count_parameters(model),
        "bytes": out.stat().st_size,
        "tensors": counts,
        "vocab": len(vocab.tokens),
        "pre_tokenizer": vocab.pre,
    }
