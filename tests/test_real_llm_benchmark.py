"""The real-LLM benchmark's own parts (benchmarks/real_llm.py): run configs, held-out text,
the plain loop's data, the scores and the table. Tiny models; no real training."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from distill.data.tasks.tokenizer import chain_tokenizer

from helpers import load_benchmark

real_llm = load_benchmark("real_llm")


def test_each_objective_is_its_settings_at_equal_steps_and_tokens(tmp_path):
    for objective, alpha, lr in (("ce", 0.0, 2e-4), ("kd", 1.0, 2e-4), ("recipe", 1.0, 1e-3)):
        cfg = real_llm.run_config(tmp_path / "student", tmp_path / "train.jsonl", tmp_path / "run", 3, objective, 200)
        assert (cfg.objective.alpha, cfg.objective.temperature, cfg.objective.divergence) == (alpha, 1.0, "forward_kl")
        assert (cfg.train.lr, cfg.train.warmup_steps, cfg.train.min_lr_ratio, cfg.train.fused_optimizer) == (lr, 20, 0.1, True)
        assert (cfg.train.steps, cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.seed) == (200, 4, 1, 3)
        assert (cfg.data.source, cfg.data.max_length, cfg.data.packing) == (str(tmp_path / "train.jsonl"), 256, True)
        assert cfg.student.name == str(tmp_path / "student") and cfg.teacher.name == real_llm.SMOL
        assert cfg.eval.text_generations == 0 and cfg.out_dir == str(tmp_path / "run")


@pytest.mark.skipif(not Path("/usr/share/common-licenses/GPL-3").exists(), reason="Debian's licence texts are not here")
def test_heldout_prose_is_two_sources_the_training_text_does_not_contain(tmp_path):
    held = real_llm.heldout_texts()
    assert sorted(held) == ["idle_help", "licences"]
    assert all(len(texts) == real_llm.HELD_ROWS_PER_SOURCE for texts in held.values())
    assert all(120 < len(t) < 1200 for texts in held.values() for t in texts)
    train = real_llm.training_rows(tmp_path, "reference+docstrings").read_text()
    reference = real_llm.training_rows(tmp_path).read_text()
    assert train.startswith(reference) and len(train) > len(reference)
    assert not any(t[:80] in train for texts in held.values() for t in texts)


def test_plain_loop_blocks_are_every_block_once_per_epoch_in_the_seeds_order(tmp_path):
    tok = chain_tokenizer()
    rows = [{"text": f"{i} + {i % 7} = {i + i % 7}. "} for i in range(40)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = real_llm.plain_blocks(path, tok, seed=0, steps=10, batch=4, length=16)
    assert a.shape == (10, 4, 16)
    assert torch.equal(a, real_llm.plain_blocks(path, tok, 0, 10, 4, 16))
    assert not torch.equal(a, real_llm.plain_blocks(path, tok, 1, 10, 4, 16))
    ids = []
    for r in rows:
        ids += tok(r["text"])["input_ids"] + [tok.eos_token_id]
    blocks = {tuple(b) for b in torch.tensor(ids[: len(ids) // 16 * 16]).view(-1, 16).tolist()}
    drawn = [tuple(b) for b in a.view(-1, 16).tolist()]
    assert len(blocks) < 40 and set(drawn[: len(blocks)]) == blocks  # every block once before any repeats
    assert set(drawn[len(blocks) :]) <= blocks


def test_scores_are_kl_agreement_and_perplexity_over_every_target():
    tok = chain_tokenizer()
    tok.padding_side = "right"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id)  # fmt: skip
    teacher, student = LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()
    texts = ["12 + 5 = 17", "3 * 4 = 12 and more", "9 - 2"]
    same = real_llm.scores(teacher, teacher, tok, texts)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1"] == 1.0
    got = real_llm.scores(student, teacher, tok, texts)
    kl = agree = nll = n = 0.0
    with torch.no_grad():
        for text in texts:  # one row at a time: no padding at all
            ids = torch.tensor([tok(text)["input_ids"]])
            t = F.log_softmax(teacher(ids).logits[0, :-1], -1)
            s = F.log_softmax(student(ids).logits[0, :-1], -1)
            kl += (t.exp() * (t - s)).sum().item()
            agree += (t.argmax(-1) == s.argmax(-1)).sum().item()
            nll -= s.gather(-1, ids[0, 1:, None]).sum().item()
            n += ids.shape[1] - 1
    assert got["tokens"] == n
    assert got["kl"] == pytest.approx(kl / n, rel=1e-4) and got["top1"] == pytest.approx(agree / n)
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_table_pairs_seeds_against_the_baseline(capsys):
    rows = [{"run": run, "seed": seed, "kl": kl, "top1": 0.4, "ppl": 200.0, "s_per_step": 5.0}
            for run, seed, kl in (("plain", 0, 2.0), ("plain", 1, 2.2), ("plain", 2, 2.1),
                                  ("depth:recipe", 0, 1.5), ("depth:recipe", 1, 1.8), ("depth:recipe", 2, 1.6))]  # fmt: skip
    real_llm.summarize(rows, "plain")
    out = capsys.readouterr().out
    recipe = next(line for line in out.splitlines() if line.startswith("| depth:recipe"))
    # differences -0.5, -0.4, -0.5: mean -0.467, sd 0.0577, t(2) 4.303 -> half width 0.143
    assert "1.633 ± 0.153" in recipe and "-0.467 [-0.610, -0.323] (n=3)" in recipe


def test_teacher_importance_is_measured_once_and_read_back_exactly(tmp_path, monkeypatch):
    from distill.models import pruning
    from distill.models.importance import Importance

    g = torch.Generator().manual_seed(0)
    measured = Importance(tokens=123, predicted=120, loss=2.25, skip_loss=torch.rand(3, dtype=torch.float64, generator=g),
                          block_influence=torch.rand(3, generator=g), heads=torch.rand(3, 4, generator=g),
                          neurons=torch.rand(3, 8, generator=g), hidden=torch.rand(3, 5, generator=g),
                          hidden_final=torch.rand(5, generator=g))  # fmt: skip
    calls = []
    monkeypatch.setattr(pruning, "measure_teacher", lambda *a: calls.append(a) or measured)
    calibration = tmp_path / "train.jsonl"
    calibration.write_text('{"text": "a"}\n')
    real_llm.teacher_importance.cache_clear()
    assert real_llm.teacher_importance(calibration) is measured
    real_llm.teacher_importance.cache_clear()
    again = real_llm.teacher_importance(calibration)
    real_llm.teacher_importance.cache_clear()
    assert len(calls) == 1 and (tmp_path / "importance.safetensors").exists()
    assert (again.tokens, again.predicted, again.loss) == (123, 120, 2.25) and isinstance(again.tokens, int)
    for name in ("skip_loss", "block_influence", "heads", "neurons", "hidden", "hidden_final"):
        assert torch.equal(getattr(again, name), getattr(measured, name)), name
