"""`distill export --gguf`: tiny random students with a real trained BPE tokenizer, written
as GGUF and read back by transformers' own GGUF loader.

Two comparisons per scheme:
- against the "stored" model, the student with each matrix replaced by exactly what the
  file holds (float16-rounded, or Q8_0 quantized and dequantized by the gguf package): the
  loaded model must match it to float32 rounding (1e-4 of the largest logit), which checks
  every tensor name, the q/k permutation and the metadata, apart from quantization;
- against the student itself, within the scheme's error: f16 keeps 11 significant bits
  (a weight moves by at most 2^-11 = 0.05% of itself), measured 0.05% of the largest logit
  here, allowed 0.2%; Q8_0 stores blocks of 32 weights as int8 times one scale (a step of
  max|w| / 127, 0.8% of a block's largest weight), measured 1.1% of the largest logit and a
  mean KL of 2e-5 nats/token here, allowed 3% and 1e-3 nats.
"""

import json
import sys
from pathlib import Path
from pydoc_data.topics import topics

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from distill.errors import DistillError
from distill.models.loading import load_causal_lm, load_tokenizer
from distill.pipeline import gguf_export
from distill.pipeline.gguf_export import export_gguf

# Sharp enough attention (init 0.05, not 0.02) that a wrong q/k row order shows in the logits.
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "max_position_embeddings": 128, "tie_word_embeddings": True,
        "initializer_range": 0.05, "rms_norm_eps": 1e-5, "rope_theta": 100000.0}  # fmt: skip
TEXTS = [
    "Knowledge distillation trains a small student.",
    "  two  spaces\n\nnewlines\tand tabs, x = 12345; y=[1,2]",
    "<|im_start|>user\nhi there<|im_end|>\n",
    "ünïcode: naïve café, € and 日本語",
    "",
]
TOL = {"f16": 2e-3, "q8_0": 3e-2}  # max |logit difference| / max |logit| against the student


def bpe_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE of 400 tokens trained on CPython's language reference (no download)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(list(topics.values())[:20], trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")  # fmt: skip


def save_student(folder: Path, model_type: str = "llama", add_bos: bool = False, **config) -> Path:
    tok = bpe_tokenizer(add_bos)
    torch.manual_seed(0)
    model = load_causal_lm(config={"model_type": model_type, **TINY, "vocab_size": len(tok), **config})
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def stored_model(model, scheme: str):
    """The student with every matrix as the file stores it (what llama.cpp computes with)."""
    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim < 2:
                continue
            a = p.numpy()
            if scheme == "q8_0" and a.shape[-1] % 32 == 0:
                a = gguf.quants.dequantize(gguf.quants.quantize(a, q8), q8)  # int8 times a float16 scale
            else:
                a = a.astype(np.float16)
            p.copy_(torch.from_numpy(np.asarray(a, np.float32)))
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits  # (B, T, V)


def load_gguf(path: Path):
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 400, (2, 48), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("scheme", ["f16", "q8_0"])
def test_round_trip_logits_and_tokenizer(tmp_path, ids, model_type, scheme):
    folder = save_student(tmp_path / "student", model_type)
    summary = export_gguf(folder, scheme)
    out = tmp_path / f"student-{scheme}.gguf"
    assert summary["out"] == str(out) and out.stat().st_size == summary["bytes"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    student = load_causal_lm(name=str(folder))
    loaded = load_gguf(out)
    assert loaded.config.model_type == model_type and loaded.config.num_hidden_layers == 2
    assert loaded.config.num_key_value_heads == 2 and loaded.config.rms_norm_eps == pytest.approx(1e-5)
    assert loaded.config.rope_parameters["rope_theta"] == pytest.approx(1e5)
    ref, got = logits(student, ids), logits(loaded, ids)
    scale = ref.abs().max()
    exact = logits(stored_model(load_causal_lm(name=str(folder)), scheme), ids)
    assert (got - exact).abs().max() <= 1e-4 * scale
    assert (got - ref).abs().max() <= TOL[scheme] * scale
    if scheme == "q8_0":
        kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
        assert kl.sum(-1).mean() <= 1e-3
    n_vectors = 5 if model_type == "llama" else 11  # norms (+ qwen2's q/k/v biases) stay float32
    assert summary["tensors"] == {"Q8_0" if scheme == "q8_0" else "F16": 15, "F32": n_vectors}
    theirs, ours = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name), load_tokenizer(str(folder))
    for text in TEXTS:
        assert theirs(text)["input_ids"] == ours(text)["input_ids"], text
        assert theirs.decode(ours(text)["input_ids"]) == ours.decode(ours(text)["input_ids"])
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (1, 2, 0)


def test_permutation_is_what_the_loader_undoes(tmp_path, ids, monkeypatch):
    """Without llama.cpp's q/k row order the loaded model is a different model: the tight
    comparison above would catch a wrong permutation."""
    folder = save_student(tmp_path / "student")
    monkeypatch.setattr(gguf_export, "permute_rows", lambda w, n_head: w)
    export_gguf(folder, "f16", tmp_path / "unpermuted.gguf")
    exact = logits(stored_model(load_causal_lm(name=str(folder)), "f16"), ids)
    got = logits(load_gguf(tmp_path / "unpermuted.gguf"), ids)
    assert (got - exact).abs().max() > 100 * 1e-4 * exact.abs().max()


def test_bos_flag_and_file_metadata(tmp_path):
    folder = save_student(tmp_path / "student", add_bos=True, head_dim=32)  # 4 heads of 32 on a width of 64
    export_gguf(folder, "f16", tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    field = lambda key: reader.fields[key].contents()
    assert field("general.architecture") == "llama" and field("general.file_type") == int(gguf.LlamaFileType.MOSTLY_F16)
    assert (field("llama.block_count"), field("llama.embedding_length"), field("llama.context_length")) == (2, 64, 128)
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (4, 2)
    assert field("llama.rope.dimension_count") == 32 and field("llama.attention.key_length") == 32
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.add_bos_token") is True and field("tokenizer.ggml.bos_token_id") == 1
    types = field("tokenizer.ggml.token_type")
    assert types[:3] == [3, 3, 3] and set(types[3:]) == {1}  # the special tokens are control tokens
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names  # tied head: llama.cpp reuses the embedding
    assert {t.tensor_type.name for t in reader.tensors if t.name.endswith("_norm.weight")} == {"F32"}
    theirs, ours = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf"), load_tokenizer(str(folder))
    assert theirs("hi")["input_ids"] == ours("hi")["input_ids"] == [1, *ours("hi", add_special_tokens=False)["input_ids"]]
    ids = torch.tensor([ours(TEXTS[0])["input_ids"]])
    student = load_causal_lm(name=str(folder))
    got, ref = logits(load_gguf(tmp_path / "m.gguf"), ids), logits(student, ids)
    assert (got - ref).abs().max() <= TOL["f16"] * ref.abs().max()


def test_run_directory_default_out(tmp_path):
    run = tmp_path / "run"
    save_student(run / "student")
    summary = export_gguf(run, "q8_0")
    assert summary["out"] == str(run / "student-q8_0.gguf") and Path(summary["out"]).is_file()
    assert summary["architecture"] == "llama" and summary["vocab"] == 400


def _no_gguf_left(folder: Path):
    assert not [p for p in folder.rglob("*") if p.name.endswith((".gguf", ".tmp"))]


def test_unsupported_and_broken_models_are_one_line_errors(tmp_path):
    gpt2 = tmp_path / "gpt2"
    tok = bpe_tokenizer()
    load_causal_lm(config={"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "vocab_size": 400}).save_pretrained(
        gpt2
    )
    tok.save_pretrained(gpt2)
    with pytest.raises(DistillError, match=r"model_type 'gpt2' has no GGUF export \(supported: llama, qwen2\)"):
        export_gguf(gpt2, "f16", tmp_path / "a.gguf")
    bare = tmp_path / "bare"
    load_causal_lm(config={"model_type": "llama", **TINY, "vocab_size": 400}).save_pretrained(bare)
    with pytest.raises(DistillError, match=r"bare: no tokenizer"):
        export_gguf(bare, "f16", tmp_path / "b.gguf")
    broken = save_student(tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(DistillError, match=r"could not load model .*broken"):
        export_gguf(broken, "f16", tmp_path / "c.gguf")
    scaled = save_student(tmp_path / "scaled", rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(DistillError, match=r"rope_type 'linear'"):
        export_gguf(scaled, "f16", tmp_path / "d.gguf")
    quantized = save_student(tmp_path / "quantized")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "torchao", "quant_type": {"default": "Int8WeightOnlyConfig"}}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(DistillError, match=r"quantized: already quantized \(torchao\); export the unquantized student"):
        export_gguf(quantized, "q8_0", tmp_path / "g.gguf")
    with pytest.raises(DistillError, match=r"neither a run directory"):
        export_gguf(tmp_path, "f16", tmp_path / "e.gguf")
    with pytest.raises(DistillError, match=r"--gguf 'q4_0': choose one of f16, q8_0"):
        export_gguf(broken, "q4_0", tmp_path / "f.gguf")
    _no_gguf_left(tmp_path)


def test_nan_weights_and_other_tokenizers_are_refused(tmp_path):
    folder = save_student(tmp_path / "nan")
    state = load_file(folder / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DistillError, match=r"model.layers.1.mlp.up_proj.weight holds NaN"):
        export_gguf(folder, "q8_0", tmp_path / "a.gguf")
    word = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    other = tmp_path / "wordlevel"
    load_causal_lm(config={"model_type": "llama", **TINY, "vocab_size": 3}).save_pretrained(other)
    PreTrainedTokenizerFast(tokenizer_object=word, unk_token="[UNK]").save_pretrained(other)
    with pytest.raises(DistillError, match=r"wordlevel: a WordLevel tokenizer; GGUF export supports byte-level BPE"):
        export_gguf(other, "f16", tmp_path / "b.gguf")
    _no_gguf_left(tmp_path)


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    folder = save_student(tmp_path / "student")

    def full_disk(self, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export_gguf(folder, "f16", tmp_path / "m.gguf")
    _no_gguf_left(tmp_path)
    (tmp_path / "m.gguf").write_bytes(b"an older export")
    with pytest.raises(DistillError, match=r"m.gguf already exists"):
        export_gguf(folder, "f16", tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_bytes() == b"an older export"


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`distill ARGS` in this process (the same entry point as the console script)."""
    from distill.cli import main

    monkeypatch.setattr(sys, "argv", ["distill", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli(tmp_path, monkeypatch, capsys):
    folder = save_student(tmp_path / "student")
    code, out, err = run_main(monkeypatch, capsys, "export", str(folder), "--gguf", "q8_0", "--out", str(tmp_path / "s.gguf"))
    assert code == 0, err
    assert json.loads(out)["out"] == str(tmp_path / "s.gguf")
    code, out, err = run_main(monkeypatch, capsys, "export", str(folder), "--gguf", "q8_0", "--out", str(tmp_path / "s.gguf"))
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and "Traceback" not in err
    assert errors == [f"error: {tmp_path / 's.gguf'} already exists; pick another --out or delete it"]
    code, out, err = run_main(monkeypatch, capsys, "export", str(folder))
    assert code == 1 and err.strip().splitlines()[-1] == "error: say the format: --gguf f16 or --gguf q8_0"
