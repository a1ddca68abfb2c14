"""A transformers tokenizer as the `tokenizer.ggml.*` metadata llama.cpp reads.

Byte-level BPE only (GPT-2 style: SmolLM2, Llama 3, Qwen2): `tokenizer.ggml.model` is
"gpt2", the tokens are listed by id in their byte-alphabet spelling, the merges as "a b"
strings, and each token has a type (normal, control for special added tokens,
user-defined for other added tokens, unused for ids the tokenizer lacks but the model's
embedding has). `tokenizer.ggml.pre` names the pre-tokenizer (how text is split before
the merges) by the name llama.cpp knows it under; a pre-tokenizer without such a name is
refused, since llama.cpp would then split text otherwise than the student was trained on.
"""

import json
from dataclasses import dataclass, field

from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

from distill.errors import DistillError

# llama.cpp's token types (gguf.TokenType), written as plain ints.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
# A name llama.cpp accepts for each split regex that transformers' GGUF loader also knows;
# where several names share one regex, the first of these is written.
_PREFERRED = ("llama-bpe", "qwen2", "gpt-4o", "tekken", "qwen35")


@dataclass
class GgufVocab:
    """Everything the writer needs for the `tokenizer.*` keys."""

    pre: str  # tokenizer.ggml.pre
    tokens: list[str]  # by id, padded to the model's vocabulary rows
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def _known_splits() -> dict[str, str]:
    """Split regex -> the llama.cpp pre-tokenizer name, from transformers' own GGUF table."""
    by_regex: dict[str, str] = {}
    names = sorted(GGUF_PRE_TOKENIZER_SPLITS, key=lambda n: _PREFERRED.index(n) if n in _PREFERRED else len(_PREFERRED))
    for name in names:
        by_regex.setdefault(GGUF_PRE_TOKENIZER_SPLITS[name], name)
    return by_regex


def _is_byte_level(step: dict | None, use_regex: bool) -> bool:
    return bool(step) and step.get("type") == "ByteLevel" and bool(step.get("use_regex", True)) == use_regex


def pre_tokenizer_name(pre: dict | None, where: str) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer (its tokenizer.json form)."""
    if _is_byte_level(pre, use_regex=True) and not pre.get("add_prefix_space", False):
        return "gpt-2"  # the GPT-2 split regex, built into ByteLevel
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    if (
        len(steps) == 2
        and steps[0].get("type") == "Digits"
        and steps[0].get("individual_digits")
        and _is_byte_level(steps[1], use_regex=True)
    ):
        return "smollm"  # each digit alone, then GPT-2's split (the hub's SmolLM tokenizers)
    if len(steps) == 2 and steps[0].get("type") == "Split" and _is_byte_level(steps[1], use_regex=False):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        name = _known_splits().get(regex)
        if name is not None:
            return name
    shape = json.dumps(pre, sort_keys=True)[:120]
    raise DistillError(
        f"{where}: its pre-tokenizer has no llama.cpp name (GPT-2, SmolLM, Llama 3, Qwen2 splits are known): {shape}"
    )


def _merge_strings(merges: list, where: str) -> list[str]:
    out = []
    for m in merges:
        pair = m.split(" ") if isinstance(m, str) else list(m)
        if len(pair) != 2 or any(" " in p for p in pair):
            raise DistillError(f"{where}: merge {m!r} is not a pair of tokens without spaces")
        out.append(f"{pair[0]} {pair[1]}")
    return out


def _added_ends(tokenizer) -> tuple[list[int], list[int]]:
    """The ids encoding puts before and after plain text (BOS, EOS), asked of the tokenizer
    itself, so a post-processor, a flag or a template all answer alike."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


def gguf_vocab(tokenizer, n_rows: int, where: str) -> GgufVocab:
    """The GGUF vocabulary of a fast byte-level BPE tokenizer.

    Args:
        tokenizer: a transformers fast tokenizer.
        n_rows: rows of the model's embedding; ids past the tokenizer's are written as
            unused "[PAD<id>]" tokens, as llama.cpp's converter does.
        where: the model's name in error messages.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DistillError(f"{where}: a slow (Python) tokenizer; GGUF export needs a fast tokenizer (tokenizer.json)")
    tree = json.loads(backend.to_str())
    model = tree.get("model") or {}
    # NFC (Qwen2's) changes only text that is not already composed; llama.cpp applies none.
    normalizer = (tree.get("normalizer") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or normalizer not in (None, "NFC"):
        kind = model.get("type") if normalizer in (None, "NFC") else f"{model.get('type')} (normalizer {normalizer})"
        raise DistillError(f"{where}: a {kind} tokenizer; GGUF export supports byte-level BPE (GPT-2 style) tokenizers")
    pre = pre_tokenizer_name(tree.get("pre_tokenizer"), where)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_rows:
        raise DistillError(f"{where}: the tokenizer has id {max(vocab.values())} but the model only {n_rows} embedding rows")
    tokens, types = [f"[PAD{i}]" for i in range(n_rows)], [UNUSED] * n_rows
    for token, i in vocab.items():
        tokens[i], types[i] = token, NORMAL
    for added in tree.get("added_tokens", []):
        if added["id"] < n_rows:
            types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    special = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "unk", "pad")}
    template = getattr(tokenizer, "chat_template", None)
    before, after = _added_ends(tokenizer)
    return GgufVocab(
        pre=pre,
        tokens=tokens,
        types=types,
        merges=_merge_strings(model.get("merges", []), where),
        special_ids={k: v for k, v in special.items() if v is not None},
        add_bos=special["bos"] is not None and before == [special["bos"]],
        add_eos=special["eos"] is not None and after == [special["eos"]],
        chat_template=template if isinstance(template, str) else None,
    )


def write_vocab(writer, vocab: GgufVocab) -> None:
    """The `tokenizer.*` keys, in the gguf package's spelling."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
              "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}  # fmt: skip
    for key, token_id in vocab.special_ids.items():
        adders[key](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)
