"""On-policy distillation in the training loop: the lambda draw, one rollout per optimizer
step, prompt masking, lambda = 0 == off-policy, resume, and config errors."""

import copy
from pathlib import Path

import pytest
import torch

import distill.training.on_policy as on_policy_mod
import distill.training.setup as setup_mod
from distill.config import OnPolicyConfig, build_config
from distill.data.build import build_examples
from distill.data.rows import collate
from distill.errors import ConfigError, DistillError
from distill.loss.terms import fused_term_sums, term_sums
from distill.loss.token_losses import IGNORE_INDEX
from distill.models.build import build_models
from distill.training.loop import train
from distill.training.on_policy import Sampler, is_on_policy_step, prompt_length, sample_examples
from distill.training.rollout import StaticDecode

from helpers import crash_at, read_metrics, student_weights


def _on_policy(tree, **sampling) -> dict:
    tree = copy.deepcopy(tree)
    tree["on_policy"] = {"lmbda": 1.0, "max_new_tokens": 12, **sampling}
    return tree


def test_lambda_draw_is_a_function_of_seed_and_step():
    draws = [is_on_policy_step(0, s, 0.5) for s in range(2000)]
    assert draws == [is_on_policy_step(0, s, 0.5) for s in range(2000)]  # same on every call (and rank)
    assert 0.45 < sum(draws) / len(draws) < 0.55
    assert draws != [is_on_policy_step(1, s, 0.5) for s in range(2000)]
    assert not any(is_on_policy_step(0, s, 0.0) for s in range(200))
    assert all(is_on_policy_step(0, s, 1.0) for s in range(200))


def test_lambda_zero_reproduces_the_off_policy_run(tiny_tree, tmp_path):
    off, zero = copy.deepcopy(tiny_tree), _on_policy(tiny_tree, temperature=0.7, top_k=5)
    zero["on_policy"]["lmbda"] = 0.0
    zero["objective"]["divergence"] = off["objective"]["divergence"] = "jsd"
    off["out_dir"], zero["out_dir"] = str(tmp_path / "off"), str(tmp_path / "zero")
    train(build_config(off), show_progress=False)
    train(build_config(zero), show_progress=False)
    drop = ("tokens_per_s", "step_s", "teacher_s")
    m_off = [{k: v for k, v in m.items() if k not in drop} for m in read_metrics(off["out_dir"])]
    m_zero = [{k: v for k, v in m.items() if k not in drop} for m in read_metrics(zero["out_dir"])]
    assert m_zero == m_off  # bit for bit
    w_off, w_zero = student_weights(off["out_dir"]), student_weights(zero["out_dir"])
    assert all(torch.equal(w_off[k], w_zero[k]) for k in w_off)


def test_on_policy_run_scores_student_samples(tiny_tree, monkeypatch):
    tree = _on_policy(tiny_tree)
    tree["train"].update(micro_batch_size=2, grad_accum=4, steps=3)
    calls = []
    real = on_policy_mod.rollout

    def counting(model, prompts, *args, **kwargs):
        calls.append(len(prompts))
        assert not model.training  # sampled in eval mode
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr(on_policy_mod, "rollout", counting)
    train(build_config(tree), show_progress=False)
    assert calls == [8, 8, 8]  # one rollout per optimizer step, for all 4 micro-batches
    metrics = read_metrics(tree["out_dir"])
    assert [m["policy_step"] for m in metrics] == [0, 1, 2]  # the weights at the start of the step
    for m in metrics:
        assert m["on_policy"] and "task_ce" not in m
        assert m["valid_tokens"] == m["generated_tokens"]  # the teacher scored every sampled token, nothing else
        assert 0 < m["generated_tokens"] <= 8 * 12 and m["kd"] >= 0 and m["rollout_s"] > 0
    assert build_config(tree).objective.divergence == "jsd"  # GKD's default divergence


def test_rollout_batch_size_splits_the_rollout(tiny_tree, monkeypatch):
    tree = _on_policy(tiny_tree, rollout_batch_size=3)
    tree["train"].update(steps=1)
    calls = []
    real = on_policy_mod.rollout
    monkeypatch.setattr(on_policy_mod, "rollout", lambda m, p, *a, **k: calls.append(len(p)) or real(m, p, *a, **k))
    train(build_config(tree), show_progress=False)
    assert calls == [3, 3, 2]


@pytest.mark.parametrize("fused", [False, True])
def test_prompt_tokens_get_no_loss(tiny_tree, fused):
    """The gradient reaching the student at positions that predict prompt tokens is exactly 0;
    at the positions that predict sampled tokens it is not."""
    cfg = build_config(_on_policy(tiny_tree))
    student, teacher, tok, vocab = build_models(cfg)
    examples = build_examples(cfg.data, tok)
    sampled, _ = sample_examples(student, examples, [0, 1, 2, 3], cfg.on_policy, tok.eos_token_id, tok.pad_token_id, 0, 0)
    for orig, new in zip(examples, sampled):
        n = prompt_length(orig)
        assert new.input_ids[:n] == orig.input_ids[:n] and new.labels[:n] == [IGNORE_INDEX] * n
        assert all(label != IGNORE_INDEX for label in new.labels[n:])
    batch = collate(sampled, tok.pad_token_id)
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "output_hidden_states": True}
    s_states = student(**kw).hidden_states[-1].detach().requires_grad_(True)
    with torch.no_grad():
        t_states = teacher(**kw).hidden_states[-1]
    if fused:
        loss, _ = fused_term_sums(
            s_states, student.get_output_embeddings(), t_states, teacher.get_output_embeddings(), batch["labels"],
            vocab, 0.0, 1.0, 2.0, "jsd", {"beta": 0.5},
        )
    else:
        logits = student.get_output_embeddings()(s_states)
        t_logits = teacher.get_output_embeddings()(t_states)
        loss = term_sums(logits, batch["labels"], t_logits, vocab, 2.0, "jsd", {"beta": 0.5})["kd"]
    loss.backward()
    grad = s_states.grad.abs().sum(-1)  # (B, T): position t predicts token t + 1
    predicts_completion = torch.zeros_like(grad, dtype=torch.bool)
    predicts_completion[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
    assert (grad[~predicts_completion] == 0).all()
    assert (grad[predicts_completion] > 0).all()


@pytest.mark.parametrize("sample_dtype,compile_decode", [("float32", False), ("bfloat16", False), ("float32", True)])
def test_on_policy_resume_equals_uninterrupted(tiny_tree, tmp_path, monkeypatch, sample_dtype, compile_decode):
    """The bf16 sampling copy too: it is rebuilt from the restored weights on resume; and
    the compiled static-cache decode."""
    tree = _on_policy(tiny_tree, temperature=1.0, sample_dtype=sample_dtype, compile_decode=compile_decode)
    tree["on_policy"]["lmbda"] = 0.5
    tree["train"].update(steps=6, checkpoint_every=3)
    full, cut = copy.deepcopy(tree), copy.deepcopy(tree)
    full["out_dir"], cut["out_dir"] = str(tmp_path / "full"), str(tmp_path / "cut")
    train(build_config(full), show_progress=False)
    crash_at(monkeypatch, 5, lambda: train(build_config(cut), show_progress=False))
    train(build_config(cut), resume=True, show_progress=False)
    mf, mc = read_metrics(full["out_dir"]), read_metrics(cut["out_dir"])
    assert [m["on_policy"] for m in mc] == [m["on_policy"] for m in mf]
    assert 0 < sum(m["on_policy"] for m in mf) < 6  # both kinds of step happen
    assert [m.get("generated_tokens") for m in mc] == [m.get("generated_tokens") for m in mf]
    for x, y in zip(mf, mc):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6, rel=0)
    wf, wc = student_weights(full["out_dir"]), student_weights(cut["out_dir"])
    for k in wf:
        torch.testing.assert_close(wc[k], wf[k], atol=1e-6, rtol=0)


def test_compiled_decode_samples_what_the_dynamic_cache_samples(tiny_tree, tmp_path, monkeypatch):
    """on_policy.compile_decode: the rollouts decode into a static cache and read a frozen
    copy of the weights; the run equals the one without it within float
    rounding (same samples, same losses)."""
    statics, runs = [], {}
    real = on_policy_mod.rollout

    def recording(model, prompts, *args, static=None, **kwargs):
        statics.append((static, any(p.requires_grad for p in model.parameters())))
        return real(model, prompts, *args, static=static, **kwargs)

    monkeypatch.setattr(on_policy_mod, "rollout", recording)
    for compiled in (False, True):
        tree = _on_policy(tiny_tree, temperature=1.0, compile_decode=compiled)
        tree["out_dir"] = str(tmp_path / str(compiled))
        train(build_config(tree), show_progress=False)
        runs[compiled] = read_metrics(tree["out_dir"])
    assert statics == [(None, True)] * 4 + [(StaticDecode(), False)] * 4
    for x, y in zip(runs[False], runs[True], strict=True):
        assert y["generated_tokens"] == x["generated_tokens"]
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5, rel=0)


def test_compiled_decode_on_cpu_without_a_compiler_is_refused_before_anything_runs(tiny_tree, monkeypatch):
    tiny_tree["on_policy"] = {"lmbda": 1.0, "compile_decode": True}
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(setup_mod.shutil, "which", lambda name: None)
    with pytest.raises(DistillError, match=r"torch.compile needs a C\+\+ compiler on CPU"):
        train(build_config(tiny_tree), show_progress=False)
    assert not Path(tiny_tree["out_dir"]).exists()


def test_on_policy_config_errors(tiny_tree, tmp_path):
    no_teacher = _on_policy(tiny_tree)
    del no_teacher["teacher"]
    no_teacher["objective"]["alpha"] = 0.0
    with pytest.raises(ConfigError, match="on_policy.lmbda > 0 needs a live 'teacher'"):
        build_config(no_teacher)
    cached = _on_policy(tiny_tree)
    cached["teacher_cache"] = str(tmp_path)
    with pytest.raises(ConfigError, match="teacher_cache only covers the dataset"):
        build_config(cached)
    with pytest.raises(ConfigError, match="top_p"):
        build_config({**_on_policy(tiny_tree), "on_policy": {"lmbda": 1.0, "top_p": 0.0}})
    explicit = _on_policy(tiny_tree)
    explicit["objective"]["divergence"] = "reverse_kl"
    assert build_config(explicit).objective.divergence == "reverse_kl"


def test_prompts_must_fit_and_exist(tiny_tree, tmp_path):
    long = _on_policy(tiny_tree, max_new_tokens=200)
    long["data"]["max_length"] = 64
    with pytest.raises(DistillError, match=r"training row 1 has a \d+-token prompt.*data.max_length=64"):
        train(build_config(long), show_progress=False)
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "Q:1+2=", "completion": "1+2=3#3"}\n{"text": "1+1=2#2"}\n')
    empty = _on_policy(tiny_tree)
    empty["data"] = {"source": str(data)}
    with pytest.raises(DistillError, match="training row 2 has an empty prompt"):
        train(build_config(empty), show_progress=False)
    assert not Path(empty["out_dir"]).exists()  # stopped before writing anything


def test_sampling_settings_reach_the_rollout():
    cfg = OnPolicyConfig(lmbda=1.0, max_new_tokens=7, temperature=0.3, top_k=5, top_p=0.8, min_new_tokens=2)
    s = on_policy_mod.sampling_of(cfg)
    assert (s.max_new_tokens, s.temperature, s.top_k, s.top_p, s.min_new_tokens) == (7, 0.3, 5, 0.8, 2)


def test_bf16_sampler_is_a_refreshed_bf16_copy(tiny_tree):
    """float32: the student itself. bfloat16: a copy whose parameters are bf16 (buffers as
    they were), tied weights still tied, refreshed from the student on every call, the
    student untouched; its next-token distribution stays close to the student's."""
    student = build_models(build_config(tiny_tree))[0].eval()
    assert Sampler("float32")(student) is student
    sampler = Sampler("bfloat16")
    copy_ = sampler(student)
    assert copy_ is not student and all(p.dtype == torch.bfloat16 for p in copy_.parameters())
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert {b.dtype for b in copy_.buffers()} == {b.dtype for b in student.buffers()}
    assert copy_.lm_head.weight is copy_.model.embed_tokens.weight
    with torch.no_grad():
        student.lm_head.weight.add_(0.5)
    again = sampler(student)
    assert again is copy_
    torch.testing.assert_close(again.lm_head.weight.float(), student.lm_head.weight, atol=2e-2, rtol=1e-2)
    ids = torch.randint(0, student.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p = student(ids).logits.log_softmax(-1)
        q = again(ids).logits.float().log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    assert 0 < kl < 1e-3


def test_bf16_sampling_keeps_1x8_equal_to_8x1(tiny_tree, tmp_path):
    """All of a process's prompts are sampled at once whatever the micro-batching, so the
    bf16 copy sees the same batch in both layouts."""
    runs = []
    for name, (mb, accum) in {"a": (1, 8), "b": (8, 1)}.items():
        tree = _on_policy(tiny_tree, temperature=1.0, sample_dtype="bfloat16")
        tree["out_dir"] = str(tmp_path / name)
        tree["train"].update(micro_batch_size=mb, grad_accum=accum)
        train(build_config(tree), show_progress=False)
        runs.append(read_metrics(tree["out_dir"]))
    for x, y in zip(*runs):
        assert x["generated_tokens"] == y["generated_tokens"]
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5, rel=0)


def test_overlap_samples_with_the_weights_of_the_step_before(tiny_tree, tmp_path):
    """on_policy.overlap: step 1's samples are drawn in a thread during step 0 from a copy
    of the weights of step 0's start; the update of step 0 does not reach them."""
    from distill.training.resume import release_run_dir
    from distill.training.setup import setup

    tree = _on_policy(tiny_tree, temperature=1.0, overlap=True)
    cfg = build_config(tree)
    run = setup(cfg, resume=False)
    try:
        source, student = run.source, run.acc.unwrap_model(run.student)
        before = copy.deepcopy(student).eval()  # the weights of step 0's start
        first = source.step_examples(0, source.indices_of(0))
        assert first.record["policy_step"] == 0 and source.ahead.step == 1
        with torch.no_grad():
            for p in student.parameters():  # step 0's update, while step 1 is being sampled
                p.add_(torch.randn_like(p) * 0.5)
        got = source.step_examples(1, source.indices_of(1))
        assert got.record["policy_step"] == 0 and got.record["rollout_wait_s"] >= 0
        examples, indices = source.dataset.task_examples[0], source.indices_of(1)
        tok = run.tokenizer
        want, _ = sample_examples(before, examples, indices, cfg.on_policy, tok.eos_token_id, tok.pad_token_id, cfg.train.seed, 1)
        now, _ = sample_examples(student.eval(), examples, indices, cfg.on_policy, tok.eos_token_id, tok.pad_token_id, cfg.train.seed, 1)
        assert [got.tasks[0][i].input_ids for i in indices] == [e.input_ids for e in want]
        assert [e.input_ids for e in now] != [e.input_ids for e in want]  # the update would have changed them
        with pytest.raises(DistillError, match="step 3 was sampled ahead for other examples"):
            source.step_examples(2, source.indices_of(2)[::-1])
    finally:
        release_run_dir(cfg.out_dir)


def test_overlap_run_lags_one_step_and_is_otherwise_the_same_run(tiny_tree, tmp_path, monkeypatch):
    """With the weights never changing (lr 1e-30) the overlapped run is the plain on-policy run
    bit for bit; policy_step records the lag (the run's first step has none); lambda < 1
    samples ahead only for steps that draw on-policy."""
    runs, calls = {}, {False: 0, True: 0}
    real = on_policy_mod.rollout
    for overlap in (False, True):

        def counting(*args, overlap=overlap, **kwargs):
            calls[overlap] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(on_policy_mod, "rollout", counting)
        tree = _on_policy(tiny_tree, temperature=1.0, overlap=overlap)
        tree["on_policy"]["lmbda"] = 0.5
        tree["train"].update(steps=8, lr=1e-30, warmup_steps=0)  # updates below float32 resolution
        tree["out_dir"] = str(tmp_path / str(overlap))
        train(build_config(tree), show_progress=False)
        runs[overlap] = read_metrics(tree["out_dir"])
    plain, ahead = runs[False], runs[True]
    on = [m["step"] - 1 for m in plain if m["on_policy"]]
    assert 2 <= len(on) < 8  # both kinds of step
    assert calls[True] == calls[False] == len(on)  # nothing sampled for an off-policy step
    assert [m.get("generated_tokens") for m in ahead] == [m.get("generated_tokens") for m in plain]
    assert [m["loss"] for m in ahead] == [m["loss"] for m in plain]
    lags = [m["step"] - 1 - m["policy_step"] for m in ahead if m["on_policy"]]
    assert lags == [0 if step == 0 else 1 for step in on]  # sampled during the step before, on-policy or not
    assert all("rollout_wait_s" in m for m in ahead if m["on_policy"])


def test_overlap_resumes_with_the_resumed_weights(tiny_tree, tmp_path, monkeypatch):
    """The trade config.md names: a resumed overlapped run samples its first step with the
    resumed weights (no lag), then lags again; it finishes like any run."""
    tree = _on_policy(tiny_tree, temperature=1.0, overlap=True)
    tree["train"].update(steps=6, checkpoint_every=3)
    crash_at(monkeypatch, 5, lambda: train(build_config(tree), show_progress=False))
    train(build_config(tree), resume=True, show_progress=False)
    metrics = read_metrics(tree["out_dir"])
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert [m["policy_step"] for m in metrics] == [0, 0, 1, 3, 3, 4]
