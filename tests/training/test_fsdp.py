"""FSDP2 (`train.sharding: fsdp`) on CPU with gloo: 2 sharded processes take the steps of one
process (logit KD, a feature term, on-policy sampling; the teacher replicated or sharded); a
sharded checkpoint resumes to the uninterrupted run; a two-node
rehearsal (two torchrun launchers on localhost, c10d rendezvous) reproduces one process."""

import copy
import json
import shutil
import types
from pathlib import Path

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import distill.training.setup as setup_mod
from distill.config import build_config
from distill.errors import DistillError
from distill.training.loop import train

from helpers import assert_resumed_equals, assert_same_students, read_metrics, train_in_two_processes


def _layouts(tree, tmp_path, **sharded):
    """(one process x 2 micro-batches, FSDP over 2 processes x 1 micro-batch): same global batch."""
    one, two = copy.deepcopy(tree), copy.deepcopy(tree)
    one["out_dir"], two["out_dir"] = str(tmp_path / "one"), str(tmp_path / "two")
    one["train"].update(micro_batch_size=4, grad_accum=2)
    two["train"].update(micro_batch_size=4, grad_accum=1, sharding="fsdp", **sharded)
    return one, two


def _summary(run_dir) -> dict:
    return json.loads((Path(run_dir) / "train_summary.json").read_text())


def _assert_same_runs(one_dir, two_dir, atol: float = 1e-5) -> None:
    m1, m2 = read_metrics(one_dir), read_metrics(two_dir)
    assert len(m1) == len(m2)
    for x, y in zip(m1, m2):
        assert y["valid_tokens"] == x["valid_tokens"]
        assert y.get("on_policy") == x.get("on_policy") and y.get("generated_tokens") == x.get("generated_tokens")
        for k in ("loss", "task_ce", "kd", "feature", "rationale_task_ce", "grad_norm"):
            if k in x:
                assert y[k] == pytest.approx(x[k], abs=atol, rel=atol), k
    assert_same_students(one_dir, two_dir, atol=atol)


CASES = {  # name: (run config sections, teacher_sharding)
    "logit KD": ({}, "replicate"),
    "feature term": ({"features": {"weight": 0.5}}, "shard"),
    "on-policy": ({"on_policy": {"lmbda": 0.5, "max_new_tokens": 12}}, "shard"),
    "frozen embeddings": ({"train": {"freeze_embeddings": True}}, "shard"),  # a root unit of frozen and trained weights
    "multitask rationales": ({"rationale": {"mode": "multitask", "weight": 0.7}}, "replicate"),
    "quantization-aware": ({"quant": {"scheme": "int4", "group_size": 16}}, "replicate"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_over_two_processes_matches_one(tiny_tree, tmp_path, case):
    sections, teacher_sharding = CASES[case]
    for name, values in sections.items():
        tiny_tree[name] = {**tiny_tree.get(name, {}), **values}
    feature_weight = tiny_tree.get("features", {}).get("weight", 0.0)
    lmbda = tiny_tree.get("on_policy", {}).get("lmbda", 0.0)
    one, two = _layouts(tiny_tree, tmp_path, teacher_sharding=teacher_sharding)
    train(build_config(one), show_progress=False)
    port = 29621 + 2 * list(CASES).index(case)
    train_in_two_processes(two, tmp_path / "two.yaml", port)
    assert _summary(two["out_dir"])["sharded"] == {"student": True, "teacher": teacher_sharding == "shard"}
    assert _summary(one["out_dir"])["sharded"] == {"student": False, "teacher": False}
    _assert_same_runs(one["out_dir"], two["out_dir"])
    if lmbda:
        assert any(m.get("on_policy") for m in read_metrics(two["out_dir"]))
    if feature_weight:
        p1 = load_file(str(Path(one["out_dir"]) / "projectors" / "projectors.safetensors"))
        p2 = load_file(str(Path(two["out_dir"]) / "projectors" / "projectors.safetensors"))
        assert sorted(p1) == sorted(p2)
        for k in p1:
            torch.testing.assert_close(p2[k], p1[k], atol=1e-5, rtol=0)
    # the export is a plain transformers folder: its own class, its tied head, the same weights
    config = json.loads((Path(two["out_dir"]) / "student" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(Path(two["out_dir"]) / "student")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def _cut_before_last_checkpoint(run_dir: Path, cut_dir: Path) -> None:
    """A copy of a finished run as a crash right after its first checkpoint would leave it."""
    shutil.copytree(run_dir, cut_dir)
    checkpoints = sorted((cut_dir / "checkpoints").iterdir())
    shutil.rmtree(checkpoints[-1])
    for name in ("student", "train_summary.json", "budget.json"):
        path = cut_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


@pytest.mark.slow
def test_sharded_checkpoint_resumes_to_the_uninterrupted_run(tiny_tree, tmp_path):
    """Checkpoints of a sharded run hold whole tensors, in the one-process format; resumed
    after a crash (gradient accumulation on), the run ends where the uninterrupted one did."""
    tiny_tree["train"].update(steps=4, checkpoint_every=2, micro_batch_size=2, grad_accum=2, sharding="fsdp")
    full = copy.deepcopy(tiny_tree)
    full["out_dir"] = str(tmp_path / "full")
    train_in_two_processes(full, tmp_path / "full.yaml", port=29641)
    assert _summary(full["out_dir"])["sharded"]["student"]
    opt = load_file(str(tmp_path / "full" / "checkpoints" / "step-000002" / "optimizer.safetensors"))
    weights = load_file(str(tmp_path / "full" / "checkpoints" / "step-000002" / "model.safetensors"))
    assert opt["state.0.exp_avg"].shape == weights["model.embed_tokens.weight"].shape  # whole, not a shard

    _cut_before_last_checkpoint(tmp_path / "full", tmp_path / "cut2")
    cut2 = {**full, "out_dir": str(tmp_path / "cut2")}
    train_in_two_processes(cut2, tmp_path / "cut2.yaml", port=29643, resume=True)
    assert_resumed_equals(full["out_dir"], cut2["out_dir"], steps=4)


@pytest.mark.slow
def test_two_node_rehearsal_matches_one_process(tiny_tree, tmp_path):
    """Two torchrun launchers of one process each, meeting at a c10d rendezvous on
    localhost as two nodes would, FSDP-sharded with the teacher sharded too."""
    one, two = _layouts(tiny_tree, tmp_path, teacher_sharding="shard")
    train(build_config(one), show_progress=False)
    train_in_two_processes(two, tmp_path / "two.yaml", port=29651, nodes=2)
    assert _summary(two["out_dir"])["processes"] == 2
    _assert_same_runs(one["out_dir"], two["out_dir"])


def test_accelerates_fsdp_plugin_stops_with_the_setting_to_use(tiny_tree, monkeypatch):
    """distill shards by itself (train.sharding); a launch through accelerate's FSDP plugin
    stops before anything is written, saying what to do instead."""
    monkeypatch.setattr(setup_mod, "DistributedType", types.SimpleNamespace(FSDP=DistributedType.NO))
    with pytest.raises(DistillError, match="set train.sharding: fsdp"):
        train(build_config(tiny_tree), show_progress=False)
    assert not Path(tiny_tree["out_dir"]).exists()


def test_bf16_sampling_overlap_and_compiled_decode_with_fsdp_are_refused_before_anything_runs(tiny_tree, monkeypatch):
    from accelerate import Accelerator

    tiny_tree["train"]["sharding"] = "fsdp"
    tiny_tree["on_policy"] = {"lmbda": 1.0, "sample_dtype": "bfloat16"}
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))  # as under torchrun
    with pytest.raises(DistillError, match="on_policy.sample_dtype: bfloat16 is not built for train.sharding: fsdp"):
        setup_mod.make_accelerator(build_config(tiny_tree))
    tiny_tree["on_policy"] = {"lmbda": 1.0, "overlap": True}
    with pytest.raises(DistillError, match="on_policy.overlap: true is not built for train.sharding: fsdp"):
        setup_mod.make_accelerator(build_config(tiny_tree))
    tiny_tree["on_policy"] = {"lmbda": 1.0, "compile_decode": True}
    with pytest.raises(DistillError, match="on_policy.compile_decode: true is not built for train.sharding: fsdp"):
        setup_mod.make_accelerator(build_config(tiny_tree))
