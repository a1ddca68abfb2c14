"""`distill export --gguf` on the packaged SmolLM2-135M-Instruct's layer-drop student: the file
transformers' GGUF loader reads back holds exactly the student's weights as the scheme stores
them, and its tokenizer encodes text (prose, code, the chat template's markers) to the same ids.

Tolerances. Against the "stored" student (each matrix as the file holds it): 1e-4 of the
largest logit (float32 arithmetic; measured 0.0 exactly). Against the student itself: f16
within 0.5% of the largest logit (measured 0.18%, a mean KL of 1.5e-5 nats/token). q8_0
within a mean KL of 0.05 nats/token: the packaged weights are Q4_1 dequantized, so Q8_0 rounds a 4-bit grid again,
and a student with 26 of 30 layers dropped amplifies the error (measured 0.015 nats, top-1
agreement 92%; the 10-layer student 0.029 and 82%).
"""

from pydoc_data.topics import topics

import pytest
import torch
from test_gguf_export import stored_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.models.loading import load_causal_lm, load_tokenizer
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
