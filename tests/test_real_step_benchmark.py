"""The real-step benchmark's own parts (benchmarks/real_step.py): each row's settings, the
plain loop's step and the phase clock. Tiny models; nothing is timed."""

import itertools

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import load_benchmark

real_step = load_benchmark("real_step")


def test_each_row_adds_one_lever_to_the_row_above(tmp_path):
    def settings(row):
        cfg = real_step.distill_config(tmp_path / "s", tmp_path / "rows.jsonl", tmp_path / "run", real_step.levers_of(row), 12)
        return {
            "packing": cfg.data.packing, "teacher_bf16": cfg.teacher.dtype == "bfloat16",
            "frozen_embeddings": cfg.train.freeze_embeddings, "split_rows": cfg.data.split_rows,
            "student_bf16": cfg.train.precision == "bf16", "host_memory": "host_memory" in real_step.levers_of(row),
        }  # fmt: skip

    rows = list(real_step.LEVERS)
    assert settings(rows[0]) == dict.fromkeys(
        ("packing", "teacher_bf16", "frozen_embeddings", "split_rows", "host_memory", "student_bf16"), False
    )
    for above, row in itertools.pairwise(rows):
        changed = {k for k, v in settings(row).items() if v != settings(above)[k]}
        assert changed == {real_step.LEVERS[row]}, row
    cfg = real_step.distill_config(tmp_path / "s", tmp_path / "rows.jsonl", tmp_path / "run", set(), 12)
    assert (cfg.objective.alpha, cfg.objective.temperature, cfg.objective.divergence) == (1.0, 1.0, "forward_kl")
    assert (cfg.train.lr, cfg.train.micro_batch_size, cfg.train.fused_optimizer, cfg.data.max_length) == (2e-4, 4, True, 256)


def test_cache_row_is_the_recommended_row_reading_the_cache(tmp_path):
    """The cache row: every lever of "+ host memory" and the teacher from WORK/cache; the
    config `distill cache` is given is the same run without the cache (so the cache's data
    and teacher match the run that reads it)."""
    recommended = real_step.levers_of("+ host memory")
    assert real_step.levers_of(real_step.CACHE_ROW) == recommended | {"teacher_cache"}
    args = (tmp_path / "s", tmp_path / "rows.jsonl", tmp_path / "run")
    cfg = real_step.distill_config(*args, real_step.levers_of(real_step.CACHE_ROW), 12, tmp_path / "cache")
    assert cfg.teacher_cache == str(tmp_path / "cache") and cfg.teacher.dtype == "bfloat16"
    assert real_step.distill_config(*args, recommended, 12, tmp_path / "cache").teacher_cache is None
    tree = real_step.distill_tree(*args, real_step.levers_of(real_step.CACHE_ROW) - {"teacher_cache"}, 12)
    assert {**tree, "teacher_cache": str(tmp_path / "cache")} == real_step.distill_tree(
        *args, real_step.levers_of(real_step.CACHE_ROW), 12, tmp_path / "cache"
    )


def _tiny(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def test_plain_step_is_forward_kl_on_full_logits_and_marks_each_phase_in_order():
    student, teacher = _tiny(0), _tiny(1)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        t = F.log_softmax(teacher(ids).logits[:, :-1], -1)
        s = F.log_softmax(student(ids).logits[:, :-1], -1)
        expected = (t.exp() * (t - s)).sum(-1).mean().item()
    before = student.model.layers[0].mlp.up_proj.weight.detach().clone()
    opt, sched = real_step.real_llm.plain_optimizer(student, 200)
    marks = []
    loss = real_step.real_llm.plain_step(student, teacher, opt, sched, ids, marks.append)
    assert abs(loss - expected) < 1e-5
    assert marks == ["teacher", "student", "loss", "backward", "optimizer"]
    assert not student.model.layers[0].mlp.up_proj.weight.equal(before)


def test_the_clock_gives_each_wrapped_call_its_own_seconds(monkeypatch):
    now = iter(float(x) for x in range(100))
    monkeypatch.setattr(real_step.time, "perf_counter", lambda: next(now))
    clock = real_step.Clock()  # t = 0
    inner = clock.timed("teacher", lambda: clock.mark("_inside_teacher") or 7)  # t = 2 in, t = 3 out

    def outer():
        clock.mark("own")  # t = 1
        return inner()

    assert outer() == 7
    clock.mark("after")  # t = 4
    assert clock.step == {"own": 1.0, "_outside": 1.0, "_inside_teacher": 1.0, "teacher": 1.0, "after": 1.0}
