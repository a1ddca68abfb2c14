"""benchmarks/on_policy.py's distill rows: each adds one lever to the row above, and the
settings the TRL rows are given with --trl-same-settings are the last row's."""

import itertools

from distill.config import build_config
from distill.training.host_memory import MMAP_THRESHOLD_MAX, TRIM_THRESHOLD

from helpers import load_benchmark

on_policy = load_benchmark("on_policy")


def test_each_distill_row_adds_one_lever_to_the_row_above(tmp_path):
    args = on_policy.parser().parse_args(["--work", str(tmp_path)])
    args.batch, args.new_tokens = 4, 64
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "The"}\n')
    paths = {"student": str(tmp_path / "s"), "prompts": str(prompts)}

    def settings(row):
        tree = on_policy.ours_tree(args, paths, tmp_path / "run", frozenset(on_policy.levers_of(row)))
        cfg = build_config(tree)
        return {"bf16_sampling": cfg.on_policy.sample_dtype == "bfloat16", "teacher_bf16": cfg.teacher.dtype == "bfloat16",
                "frozen_embeddings": cfg.train.freeze_embeddings, "overlap": cfg.on_policy.overlap,
                "compile_decode": cfg.on_policy.compile_decode}  # fmt: skip

    rows = list(on_policy.DISTILL_ROWS)
    assert not any(settings(rows[0]).values())
    for above, row in itertools.pairwise(rows):
        changed = {k for k, v in settings(row).items() if v != settings(above)[k]}
        assert changed == {on_policy.DISTILL_ROWS[row]}, row
    cfg = build_config(on_policy.ours_tree(args, paths, tmp_path / "run"))
    assert (cfg.on_policy.lmbda, cfg.objective.divergence, cfg.train.fused_optimizer) == (1.0, "jsd", True)
    assert on_policy.MALLOC_SETTING == {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_MAX),
                                        "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}  # fmt: skip
