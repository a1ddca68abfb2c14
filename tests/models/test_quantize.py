"""Quantization of a model (distill.models.quantize, quantized_io) on tiny random models:
fake quantization equals real quantization, the pickle-free folder round trip, sizes, and
every damaged or unsupported input as one line with nothing half-written."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from distill.data.tasks.tokenizer import chain_tokenizer
from distill.errors import DistillError
from distill.models.loading import load_causal_lm
from distill.models.quantize import Scheme, prepare_qat, quantize_model
from distill.models.quantized_io import pack_int4, quantize_folder, unpack_int4

from helpers import TINY_QWEN2, TINY_STUDENT

pytest.importorskip("torchao")

SCHEMES = [Scheme("int8"), Scheme("int4", 16), Scheme("int4", 32, activations=True)]


def _model(config=TINY_STUDENT, seed=0):
    torch.manual_seed(seed)
    tok = chain_tokenizer()
    return load_causal_lm(config={**config, "vocab_size": len(tok)}), tok


@pytest.fixture
def folder(tmp_path):
    """A full-precision tiny llama saved with its tokenizer."""
    model, tok = _model()
    model.save_pretrained(tmp_path / "fp")
    tok.save_pretrained(tmp_path / "fp")
    return tmp_path / "fp"


def _ids(vocab, seed=1):
    return torch.randint(0, vocab, (3, 11), generator=torch.Generator().manual_seed(seed))  # (B, T)


def test_pack_int4_round_trips_odd_lengths():
    q = torch.tensor([[-8, 7, 0, -1, 3], [1, -2, 5, -7, 6]], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.numel() == 5  # 10 values, two per byte
    assert packed[0].item() == 0 | (15 << 4)  # -8 + 8 = 0 in the low nibble, 7 + 8 = 15 in the high one
    torch.testing.assert_close(unpack_int4(packed, (2, 5)), q, atol=0, rtol=0)
    odd = torch.tensor([-3, 4, -8], dtype=torch.int8)
    torch.testing.assert_close(unpack_int4(pack_int4(odd), (3,)), odd, atol=0, rtol=0)


@pytest.mark.parametrize("scheme", SCHEMES, ids=["int8", "int4-g16", "int4-g32-act"])
@pytest.mark.parametrize("config", [TINY_STUDENT, TINY_QWEN2], ids=["llama", "qwen2"])
def test_fake_quantized_forward_equals_the_quantized_one(scheme, config):
    """QAT's fake quantization is the arithmetic of the real quantization (1e-5)."""
    fake, _ = _model(config)
    real, _ = _model(config)
    plain, _ = _model(config)
    names = prepare_qat(fake, scheme)
    assert quantize_model(real, scheme) == names
    assert "lm_head" not in names and len(names) == 7 * config["num_hidden_layers"]
    ids = _ids(plain.config.vocab_size)
    with torch.no_grad():
        f, r, p = fake(ids).logits, real(ids).logits, plain(ids).logits  # (B, T, V)
    torch.testing.assert_close(f, r, atol=1e-5, rtol=0)
    assert (r - p).abs().max() > 0  # quantization did change the function


@pytest.mark.parametrize("scheme", SCHEMES, ids=["int8", "int4-g16", "int4-g32-act"])
def test_quantized_folder_loads_back_with_one_call_and_generates(folder, tmp_path, scheme):
    out = tmp_path / f"q-{scheme.name}"
    record = quantize_folder(folder, out, scheme)
    model = load_causal_lm(str(out))  # the one call; AutoTokenizer reads the same folder
    reference = load_causal_lm(str(folder))
    quantize_model(reference, scheme)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=0, rtol=0)
    gen = model.generate(ids[:, :4], attention_mask=torch.ones_like(ids[:, :4]), max_new_tokens=5, do_sample=False)
    assert gen.shape == (3, 9)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie survives
    saved = json.loads((out / "quant.json").read_text())
    assert saved["scheme"] == scheme.name and saved["tied"] == ["lm_head.weight"]
    assert saved["weights_bytes"] == (out / "quantized.safetensors").stat().st_size
    assert saved["fp_weights_bytes"] == 4 * record["params"]
    stored = load_file(str(out / "quantized.safetensors"))
    qdata = stored["model.layers.0.mlp.down_proj.weight.qdata"]
    assert qdata.dtype == (torch.int8 if scheme.name == "int8" else torch.uint8)
    assert qdata.numel() == 32 * 64 // (1 if scheme.name == "int8" else 2)
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # no pickle


def test_sizes_on_disk_shrink_with_the_bits(folder, tmp_path):
    model, tok = _model({**TINY_STUDENT, "hidden_size": 64, "intermediate_size": 256})
    model.save_pretrained(tmp_path / "wide")
    tok.save_pretrained(tmp_path / "wide")
    b8 = quantize_folder(tmp_path / "wide", tmp_path / "w8", Scheme("int8"))
    b4 = quantize_folder(tmp_path / "wide", tmp_path / "w4", Scheme("int4", 64))
    assert b4["weights_bytes"] < b8["weights_bytes"] < b8["fp_weights_bytes"]


def test_group_size_must_divide_the_inputs(folder, tmp_path):
    with pytest.raises(DistillError, match=r"model\.layers\.0\.self_attn\.q_proj: input size 32 is not a multiple of quant\.group_size 24"):
        quantize_folder(folder, tmp_path / "q", Scheme("int4", 24))
    assert not (tmp_path / "q").exists()


def test_missing_torchao_is_one_line_naming_pip(folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao now raises ImportError
    with pytest.raises(DistillError, match=r"quantization needs torchao.*pip install 'torchao"):
        quantize_folder(folder, tmp_path / "q", Scheme("int8"))
    assert not (tmp_path / "q").exists()


def _damage(out, how):
    weights = out / "quantized.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:500])
    elif how == "missing tensor":
        tensors = load_file(str(weights))
        del tensors["model.layers.1.mlp.up_proj.weight.scale"]
        save_file(tensors, str(weights))
    elif how == "wrong shape":
        tensors = load_file(str(weights))
        tensors["model.layers.0.self_attn.o_proj.weight.qdata"] = torch.zeros(3, dtype=torch.uint8)
        save_file(tensors, str(weights))
    else:
        record = json.loads((out / "quant.json").read_text())
        record.update({"scheme": "int3"} if how == "unknown scheme" else {"modules": ["model.norm"]})
        (out / "quant.json").write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", r"could not read .*quantized\.safetensors"),
        ("missing tensor", r"quantized\.safetensors: tensor model\.layers\.1\.mlp\.up_proj\.weight\.scale is missing"),
        ("wrong shape", r"tensor model\.layers\.0\.self_attn\.o_proj\.weight\.qdata is torch\.uint8 \(3,\), expected"),
        ("unknown scheme", r"quant\.json: unsupported scheme 'int3'"),
        ("not linear", r"quant\.json: 'model\.norm' is not a linear layer"),
    ],
)
def test_damaged_quantized_folder_is_one_line(folder, tmp_path, how, message):
    out = tmp_path / "q"
    quantize_folder(folder, out, Scheme("int4", 16))
    _damage(out, how)
    with pytest.raises(DistillError, match=message) as info:
        load_causal_lm(str(out))
    assert "\n" not in str(info.value)


def test_refusals_write_nothing(folder, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(DistillError, match="exists and is not a quantized model folder"):
        quantize_folder(folder, taken, Scheme("int8"))
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    quantize_folder(folder, tmp_path / "q8", Scheme("int8"))
    with pytest.raises(DistillError, match="already quantized"):
        quantize_folder(tmp_path / "q8", tmp_path / "again", Scheme("int4"))
    assert not (tmp_path / "again").exists()
    with pytest.raises(DistillError, match="loads in float32"):
        load_causal_lm(str(tmp_path / "q8"), dtype="bfloat16")
    # plain transformers does not mistake the folder for a full-precision model
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q8")
