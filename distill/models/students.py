"""Students of another shape, made from a teacher.

- fewer layers, initialised by copying chosen teacher layers (layer drop): every k-th, an
  even spread of n, or an explicit list; embeddings, final norm and lm_head are copied too;
- narrower (hidden / intermediate size, attention and key-value heads): random init;
- another family: any transformers causal-LM config sharing the tokenizer: random init;
- cut from the teacher's weights by measured importance: `pruning.py` (`--prune`).

    distill student --from packaged:smollm2-135m-instruct --layers 10 --out students/smol-10
"""

import copy
import json
import math
import re
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from distill.errors import DistillError
from distill.models.loading import count_parameters, load_causal_lm, load_tokenizer
from distill.paths import atomic_folder, read_json


def decoder_layers(model) -> tuple[str, nn.ModuleList]:
    """(dotted name, module) of the model's stack of decoder layers."""
    n = model.config.get_text_config().num_hidden_layers
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    found = [(name, m) for name, m in found if name.split(".")[-1] in ("layers", "h", "layer", "blocks")] or found
    if len(found) != 1:
        raise DistillError(f"{type(model).__name__}: cannot tell which module list holds its {n} decoder layers")
    return found[0]


def spread_layers(n_teacher: int, n: int) -> list[int]:
    """n layer indices spread evenly over 0..n_teacher-1, the first and the last included."""
    if not 1 <= n <= n_teacher:
        raise DistillError(f"--layers {n}: the teacher has {n_teacher} layers; keep between 1 and {n_teacher}")
    if n == 1:
        return [n_teacher - 1]
    return sorted({math.floor(i * (n_teacher - 1) / (n - 1) + 0.5) for i in range(n)})  # halves up


def every_kth_layer(n_teacher: int, k: int) -> list[int]:
    """Layers 0, k, 2k, ... (the last layer is not added)."""
    if not 1 <= k <= n_teacher:
        raise DistillError(f"--every {k}: must be between 1 and the teacher's {n_teacher} layers")
    return list(range(0, n_teacher, k))


def check_kept(keep: list[int], n_teacher: int) -> list[int]:
    if not keep:
        raise DistillError("no layers to keep")
    bad = [i for i in keep if not 0 <= i < n_teacher]
    if bad:
        raise DistillError(f"--keep: layer {bad[0]} does not exist; the teacher has layers 0..{n_teacher - 1}")
    if sorted(set(keep)) != list(keep):
        raise DistillError(f"--keep {keep}: give distinct layers in increasing order")
    return list(keep)


# Config keys that hold one value per decoder layer (in transformers' model families).
PER_LAYER_KEYS = ("layer_types", "no_rope_layers", "activation_sparsity_pattern", "intermediate_size",
                  "num_key_value_heads", "num_attention_heads", "num_kv_heads", "num_query_heads")  # fmt: skip


def drop_config(config, keep: list[int]):
    """A copy of the config with only the kept layers (and their per-layer settings)."""
    config = copy.deepcopy(config)
    text = config.get_text_config()
    n_old = text.num_hidden_layers
    text.num_hidden_layers = len(keep)
    for key in PER_LAYER_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, (list, tuple)) and len(value) == n_old:
            setattr(text, key, [value[i] for i in keep])
    return config


def layer_drop_student(teacher, keep: list[int]):
    """A student with the teacher's kept decoder layers (copied), embeddings, norm and head."""
    prefix, _ = decoder_layers(teacher)
    keep = check_kept(keep, teacher.config.get_text_config().num_hidden_layers)
    config = drop_config(teacher.config, keep)
    with torch.device("meta"):
        student = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype)
    new_index = {old: new for new, old in enumerate(keep)}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    state = {}
    for key, value in teacher.state_dict().items():
        m = pattern.match(key)
        if m is None:
            state[key] = value.clone()
        elif int(m.group(1)) in new_index:
            state[f"{prefix}.{new_index[int(m.group(1))]}.{key[m.end():]}"] = value.clone()
    student.load_state_dict(state, strict=True, assign=True)
    student.tie_weights()  # re-tie lm_head to the embeddings where the config ties them
    _rebuild_buffers(student, teacher)
    return student.eval()


def _rebuild_buffers(student, teacher) -> None:
    """Non-persistent buffers (rotary inverse frequencies) are not in the state dict: copy them."""
    teacher_buffers = dict(teacher.named_buffers())
    for name, buf in student.named_buffers():
        if buf.device.type == "meta":
            source = teacher_buffers.get(name)
            if source is None:
                raise DistillError(f"layer drop: no teacher buffer for {name}")
            module_name, _, attr = name.rpartition(".")
            student.get_submodule(module_name).register_buffer(attr, source.clone(), persistent=False)


def resized_config(
    config,
    layers: int | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
):
    """The teacher's config with another depth / width / head count (a random-init student)."""
    config = copy.deepcopy(config)
    text = config.get_text_config()
    if layers is not None:
        config = drop_config(config, spread_layers(text.num_hidden_layers, layers))
        text = config.get_text_config()
    for key, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                       ("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if value is not None:
            if value < 1:
                raise DistillError(f"{key} must be positive, got {value}")
            setattr(text, key, value)
    if kv_heads is None and heads is not None and getattr(text, "num_key_value_heads", None) is not None:
        text.num_key_value_heads = min(text.num_key_value_heads, heads)
    n_heads, n_kv = text.num_attention_heads, getattr(text, "num_key_value_heads", text.num_attention_heads)
    if n_heads % n_kv:
        raise DistillError(f"{n_heads} attention heads are not a multiple of {n_kv} key-value heads")
    if (hidden_size is not None or heads is not None) and hasattr(text, "head_dim"):
        if text.hidden_size % n_heads:
            raise DistillError(f"hidden size {text.hidden_size} is not a multiple of {n_heads} heads")
        text.head_dim = text.hidden_size // n_heads
    return config


def config_from_file(path: str | Path, vocab_size: int, tokenizer) -> object:
    """A transformers config from a JSON file with `model_type` (another family)."""
    tree = read_json(path, "student config")
    if not isinstance(tree, dict) or "model_type" not in tree:
        raise DistillError(f"{path}: a student config needs a 'model_type'")
    tree = dict(tree)
    model_type = tree.pop("model_type")
    tree.setdefault("vocab_size", vocab_size)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(tokenizer, key, None) is not None:
            tree.setdefault(key, getattr(tokenizer, key))
    try:
        return AutoConfig.for_model(model_type, **tree)
    except ValueError:
        raise DistillError(f"{path}: unknown model_type {model_type!r}") from None


def random_student(config, seed: int, dtype: torch.dtype):
    torch.manual_seed(seed)
    try:
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    except ValueError:
        raise DistillError(f"model_type {config.model_type!r} is not a causal language model") from None


def _json_lists_inline(value, depth: int = 0) -> str:
    """JSON with each object key on its own line and every list on one line (long score lists)."""
    if not isinstance(value, dict) or not value:
        return json.dumps(value)
    pad = "  " * (depth + 1)
    items = ",\n".join(f"{pad}{json.dumps(k)}: {_json_lists_inline(v, depth + 1)}" for k, v in value.items())
    return "{\n" + items + "\n" + "  " * depth + "}"


def save_student(student, tokenizer, out: str | Path, provenance: dict, lists_inline: bool = False) -> Path:
    """save_pretrained + tokenizer + student.json into `out`, whole or not at all.

    lists_inline: write each list of student.json on one line (pruning's per-neuron scores).
    """
    out = Path(out)
    if out.exists():
        raise DistillError(f"{out} already exists; pick another --out")
    record = {**provenance, "params": count_parameters(student)}
    with atomic_folder(out) as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "student.json").write_text(_json_lists_inline(record) if lists_inline else json.dumps(record, indent=2))
    return out


def make_student(
    teacher_name: str,
    out: str | Path,
    layers: int | None = None,
    every: int | None = None,
    keep: list[int] | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    config_file: str | None = None,
    seed: int = 0,
    dtype: str = "float32",
) -> dict:
    """Build and save a student of `teacher_name`; returns its student.json record."""
    chosen = [x is not None for x in (layers, every, keep)]
    if sum(chosen) > 1:
        raise DistillError("give at most one of --layers, --every, --keep")
    resize = any(x is not None for x in (hidden_size, intermediate_size, heads, kv_heads))
    if config_file is not None and (resize or any(chosen)):
        raise DistillError("--config gives the whole student; drop the layer and width options")
    if resize and (every is not None or keep is not None):
        raise DistillError("a narrower student starts from random weights: give its depth with --layers, not --every / --keep")
    teacher = load_causal_lm(name=teacher_name, dtype=dtype)
    tokenizer = load_tokenizer(teacher_name)
    n_teacher = teacher.config.get_text_config().num_hidden_layers
    record = {"teacher": teacher_name, "teacher_params": count_parameters(teacher), "teacher_layers": n_teacher}
    if config_file is not None:
        vocab = teacher.get_output_embeddings().weight.shape[0]
        student = random_student(config_from_file(config_file, vocab, tokenizer), seed, teacher.dtype)
        record |= {"init": "random", "config_file": str(config_file), "seed": seed}
    elif resize:
        config = resized_config(teacher.config, layers, hidden_size, intermediate_size, heads, kv_heads)
        student = random_student(config, seed, teacher.dtype)
        record |= {"init": "random", "seed": seed}
    else:
        if layers is not None:
            keep = spread_layers(n_teacher, layers)
        elif every is not None:
            keep = every_kth_layer(n_teacher, every)
        elif keep is None:
            raise DistillError("say what to change: --layers, --every, --keep, a width option or --config")
        student = layer_drop_student(teacher, keep)
        record |= {"init": "layer_drop", "kept_layers": keep}
    text = student.config.get_text_config()
    record |= {"layers": text.num_hidden_layers, "hidden_size": text.hidden_size, "model_type": student.config.model_type}
    save_student(student, tokenizer, out, record)
    return {**record, "out": str(out), "params": count_parameters(student)}
