"""`distill export --gguf` on the packaged SmolLM2-135M-Instruct's layer-drop student: the file
transformers' GGUF loader reads back holds exactly the student's weights as the scheme stores
them, and its tokenizer encodes text (prose, code, the chat template's markers) to the same ids;
and the file has the layout llama.cpp's own converter wrote for the packaged model.

Tolerances. Against the "stored" student (each matrix as the file holds it): 1e-4 of the
largest logit (float32 arithmetic; measured 0.0 exactly). Against the student itself: f16
within 0.5% of the largest logit (measured 0.18%, a mean KL of 1.5e-5 nats/token). q8_0
within a mean KL of 0.05 nats/token: the packaged weights are Q4_1 dequantized, so Q8_0
rounds a 4-bit grid again, and a student with 26 of 30 layers dropped amplifies the error
(measured 0.015 nats, top-1 agreement 92%; the 10-layer student 0.029 and 82%).
"""

import json
from pydoc_data.topics import topics

import gguf
import numpy as np
import pytest
import torch
from test_gguf_export import stored_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.models.loading import _packaged_gguf, load_causal_lm, load_tokenizer
from distill.models.students import make_student
from distill.pipeline.gguf_export import export_gguf

pytestmark = pytest.mark.real

ALIAS = "packaged:smollm2-135m-instruct"


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smol") / "student-4"
    make_student(ALIAS, folder, layers=4)
    return folder


@pytest.fixture(scope="module")
def reference(student):
    """The student's tokenizer, 128 tokens of prose and the student's logits on them."""
    tokenizer = load_tokenizer(str(student))
    ids = torch.tensor([tokenizer(prose())["input_ids"][:128]])
    with torch.no_grad():
        return tokenizer, ids, load_causal_lm(name=str(student))(ids).logits  # (1, T, V)


def prose() -> str:
    return " ".join(topics["if"].split()) + "\n\n" + " ".join(topics["while"].split())


@pytest.mark.parametrize("scheme", ["f16", "q8_0"])
def test_smollm2_student_round_trip(student, reference, scheme):
    summary = export_gguf(student, scheme)
    out = student.parent / f"student-4-{scheme}.gguf"
    assert summary["out"] == str(out) and summary["architecture"] == "llama" and summary["vocab"] == 49152
    ours, ids, ref = reference
    if scheme == "f16":  # the tokenizer metadata does not depend on the scheme
        theirs = AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
        chat = ours.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}], tokenize=False)
        for text in (prose(), chat, "def f(x):\n    return x ** 2  # ünïcode €"):
            assert theirs(text)["input_ids"] == ours(text)["input_ids"]
    with torch.no_grad():
        exact = stored_model(load_causal_lm(name=str(student)), scheme)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name).eval()(ids).logits
    assert (got - exact).abs().max() <= 1e-4 * ref.abs().max()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean()
    if scheme == "f16":
        assert (got - ref).abs().max() <= 5e-3 * ref.abs().max()
    assert kl.mean() <= 5e-2, (kl.mean().item(), agree.item())
    print(f"{scheme}: {summary['bytes'] / 1e6:.1f} MB, max |dlogit| {(got - ref).abs().max():.4f} "
          f"of {ref.abs().max():.2f}, KL {kl.mean():.2e}, top-1 {agree:.3f}")  # fmt: skip


def test_same_layout_as_llama_cpp_converter(student, tmp_path):
    """The packaged SmolLM2 file was written by llama.cpp's own converter. The student's f16
    export must hold, under each name, that file's tensor (dequantized from Q4_1) rounded to
    float16, bit for bit: the same names, the same q/k row order, the same shapes; and the same
    tokenizer metadata. No GGUF reader's inverse permutation is involved here."""
    original = gguf.GGUFReader(_packaged_gguf(ALIAS))
    out = tmp_path / "s.gguf"
    export_gguf(student, "f16", out)
    ours = gguf.GGUFReader(out)
    kept = json.loads((student / "student.json").read_text())["kept_layers"]  # student layer i = teacher layer kept[i]
    theirs = {t.name: t for t in original.tensors}
    for t in ours.tensors:
        name = t.name
        if name.startswith("blk."):
            block, rest = name.split(".", 2)[1:]
            name = f"blk.{kept[int(block)]}.{rest}"
        source = theirs[name]
        expected = gguf.quants.dequantize(source.data, source.tensor_type).reshape(t.data.shape)
        if t.tensor_type == gguf.GGMLQuantizationType.F16:
            expected = expected.astype(np.float16)
        assert np.array_equal(np.asarray(t.data), expected), t.name
    assert len(ours.tensors) == 2 + 9 * len(kept)  # token_embd, output_norm, 9 per block; no output.weight (tied)

    def field(reader, key):
        return reader.fields[key].contents()

    for key in ("tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "unknown_token_id",
                "padding_token_id", "add_bos_token", "model"):  # fmt: skip
        assert field(ours, f"tokenizer.ggml.{key}") == field(original, f"tokenizer.ggml.{key}"), key
    assert field(ours, "tokenizer.chat_template") == field(original, "tokenizer.chat_template")
    for key in ("context_length", "embedding_length", "feed_forward_length", "attention.head_count",
                "attention.head_count_kv", "rope.freq_base", "attention.layer_norm_rms_epsilon",
                "rope.dimension_count", "vocab_size"):  # fmt: skip
        assert field(ours, f"llama.{key}") == field(original, f"llama.{key}"), key
    assert field(ours, "llama.block_count") == len(kept)
