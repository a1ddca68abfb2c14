"""The packaged real model (SmolLM2-135M-Instruct, GGUF Q4_1) through distill.models.loading.

Uses the default cache folder on purpose: the first run dequantises (~20 s), later
runs read the cached safetensors in well under a second.
"""

import math
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch

from distill.models.loading import (
    _gguf_cache_dir,
    _packaged_gguf,
    check_vocabularies,
    count_parameters,
    load_causal_lm,
    load_tokenizer,
)

pytestmark = pytest.mark.real

ALIAS = "packaged:smollm2-135m-instruct"


@pytest.fixture(scope="module")
def model():
    return load_causal_lm(ALIAS)


@pytest.fixture(scope="module")
def tokenizer(model):  # after the model, so the tokenizer comes from the cache folder
    return load_tokenizer(ALIAS)


def english_text() -> str:
    # Real English prose that ships with CPython, so no data download is needed.
    return " ".join(topics["if"].split("\n\n")[3].split())


def test_architecture(model):
    assert type(model).__name__ == "LlamaForCausalLM"
    config = model.config
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (49152, 576, 30)
    assert getattr(config, "quantization_config", None) is None
    assert not getattr(model, "is_quantized", False)
    assert model.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings survive
    assert 130e6 < count_parameters(model) < 140e6


def test_tokenizer_round_trip_and_vocab(model, tokenizer):
    sentence = "Knowledge distillation trains a small student to imitate a teacher."
    ids = tokenizer(sentence)["input_ids"]
    assert 5 < len(ids) < 30
    assert tokenizer.decode(ids, skip_special_tokens=True) == sentence
    assert len(tokenizer) == 49152
    n = check_vocabularies(tokenizer, tokenizer, model.config.vocab_size, model.config.vocab_size)
    assert n == 49152


def test_english_loss_and_greedy_continuation(model, tokenizer):
    ids = tokenizer(english_text(), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    # A random model sits near ln(49152) = 10.8 nats; the real one is far below.
    assert loss < 4.0, loss

    prompt = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text
    assert sum(c.isascii() for c in text) == len(text), text


def test_second_load_hits_cache(model):
    folder = _gguf_cache_dir(_packaged_gguf(ALIAS))
    weights = folder / "model.safetensors"
    assert weights.is_file() and (folder / "tokenizer.json").is_file()
    stamp = weights.stat().st_mtime_ns

    again = load_causal_lm(ALIAS)
    assert weights.stat().st_mtime_ns == stamp  # read, not rebuilt
    first, second = model.state_dict(), again.state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    # No half-written temp folders left beside the cache.
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".tmp")]


def test_save_pretrained_and_one_training_step(tmp_path: Path, tokenizer):
    model = load_causal_lm(ALIAS)  # own copy: training must not touch the shared fixture
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    watched = model.model.layers[0].mlp.up_proj.weight
    before = watched.detach().clone()
    ids = tokenizer(english_text(), return_tensors="pt")["input_ids"][:, :32]
    loss = model(ids, labels=ids).loss
    assert math.isfinite(loss.item())
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, watched.detach())


def test_bfloat16_load(tokenizer):
    model = load_causal_lm(ALIAS, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    ids = tokenizer("The sky is blue.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits.float()).all()


def test_direct_gguf_path_shares_the_cache(model):
    gguf = _packaged_gguf(ALIAS)
    direct = load_causal_lm(str(gguf))
    same_folder = load_causal_lm(str(gguf.parent), gguf_file=gguf.name)
    embed = model.model.embed_tokens.weight
    assert torch.equal(direct.model.embed_tokens.weight, embed)
    assert torch.equal(same_folder.model.embed_tokens.weight, embed)
