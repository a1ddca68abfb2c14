"""Linear CKA and the alignment probe: alignment.jsonl and latent snapshots in the run dir."""

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from distill.config import build_config
from distill.training.alignment import linear_cka
from distill.training.loop import train


def kernel_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA from its definition: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), linear kernels."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = h @ (x.double() @ x.double().T) @ h, h @ (y.double() @ y.double().T) @ h
    return float((k * l).sum() / torch.sqrt((k * k).sum() * (l * l).sum()))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(4, 40), d1=st.integers(1, 12), d2=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_linear_cka_equals_the_kernel_definition(n, d1, d2, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d1, generator=g), torch.randn(n, d2, generator=g)
    assert linear_cka(x, y) == pytest.approx(kernel_cka(x, y), abs=1e-9)
    assert 0.0 <= linear_cka(x, y) <= 1.0 + 1e-12


def test_linear_cka_invariances():
    torch.manual_seed(0)
    x = torch.randn(200, 16)
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3.0 * x @ q + 5.0) == pytest.approx(1.0, abs=1e-9)  # rotation, scale, shift
    assert linear_cka(x, torch.randn(200, 16)) < 0.2  # unrelated
    stretched = x * torch.linspace(0.1, 10, 16)  # a non-isotropic linear map lowers it
    assert linear_cka(x, stretched) < 0.9
    with pytest.raises(ValueError, match=r"\(200, 16\) and \(100, 16\)"):
        linear_cka(x, x[:100])


def test_probe_logs_cka_and_saves_latents_at_checkpoints(tiny_tree):
    tiny_tree["features"] = {"weight": 0.5, "probe_examples": 6, "probe_every": 1}
    tiny_tree["train"].update(steps=4, checkpoint_every=2)
    summary = train(build_config(tiny_tree), show_progress=False)
    run = Path(tiny_tree["out_dir"])
    records = [json.loads(x) for x in (run / "alignment.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    for r in records:
        assert [(p["student"], p["teacher"]) for p in r["pairs"]] == [(1, 1), (2, 2)]  # hidden_states indices
        assert [(p["student_layer"], p["teacher_layer"]) for p in r["pairs"]] == [(0, 0), (1, 1)]  # config layers
        assert all(0 <= p["cka"] <= 1 and 0 <= p["cka_projected"] <= 1 for p in r["pairs"])
    assert summary["alignment"]["cka_mean"] == records[-1]["cka_mean"]

    latents = run / "latents"
    assert sorted(p.name for p in latents.iterdir()) == [
        "probe.json", "step-000000.safetensors", "step-000002.safetensors", "step-000004.safetensors", "teacher.safetensors"
    ]  # fmt: skip
    meta = json.loads((latents / "probe.json").read_text())
    n = len(meta["tokens"]["token_id"])
    assert n == records[0]["tokens"] and len(set(meta["tokens"]["example"])) == 6
    teacher = load_file(str(latents / "teacher.safetensors"))
    assert {k: tuple(v.shape) for k, v in teacher.items()} == {"teacher.1": (n, 48), "teacher.2": (n, 48)}
    last = load_file(str(latents / "step-000004.safetensors"))
    assert {k: tuple(v.shape) for k, v in last.items()} == {
        "student.1": (n, 32), "student.2": (n, 32), "projected.0": (n, 48), "projected.1": (n, 48)
    }  # fmt: skip
    # the snapshot reproduces the logged CKA
    cka = linear_cka(last["projected.1"].float(), teacher["teacher.2"].float())
    assert cka == pytest.approx(records[-1]["pairs"][1]["cka_projected"], abs=2e-3)  # fp16 storage


def test_logit_only_run_is_probed_on_raw_states(tiny_tree):
    summary = train(build_config(tiny_tree), show_progress=False)
    run = Path(tiny_tree["out_dir"])
    assert summary["feature_pairs"] == 0 and not (run / "projectors").exists()
    record = json.loads((run / "alignment.jsonl").read_text().splitlines()[-1])
    assert "cka_projected" not in record["pairs"][0] and 0 <= record["cka_mean"] <= 1
    assert set(load_file(str(run / "latents" / "step-000004.safetensors"))) == {"student.1", "student.2"}


def test_probe_off_without_teacher_model_or_when_asked(tiny_tree, tmp_path):
    tiny_tree["features"] = {"probe_examples": 0}
    train(build_config(tiny_tree), show_progress=False)
    assert not (Path(tiny_tree["out_dir"]) / "latents").exists()
    tiny_tree["out_dir"] = str(tmp_path / "labels")
    tiny_tree["features"] = {}
    tiny_tree["objective"]["alpha"] = 0.0  # label-only: the teacher is not loaded
    train(build_config(tiny_tree), show_progress=False)
    assert not (tmp_path / "labels" / "alignment.jsonl").exists()


def test_probe_token_budget_takes_whole_examples(tiny_tree):
    tiny_tree["features"] = {"probe_examples": 8, "probe_tokens": 100}
    train(build_config(tiny_tree), show_progress=False)
    meta = json.loads((Path(tiny_tree["out_dir"]) / "latents" / "probe.json").read_text())
    tokens = meta["tokens"]
    assert 0 < len(tokens["token_id"]) <= 100
    per_example = [tokens["example"].count(e) for e in sorted(set(tokens["example"]))]
    positions = [[p for p, e in zip(tokens["position"], tokens["example"]) if e == k] for k in sorted(set(tokens["example"]))]
    assert all(pos == list(range(1, n + 1)) for pos, n in zip(positions, per_example))  # whole, first token left out
    assert any(tokens["completion"]) and not all(tokens["completion"])


def test_probe_can_keep_the_first_token(tiny_tree):
    tiny_tree["features"] = {"probe_examples": 3, "skip_first_token": False}
    train(build_config(tiny_tree), show_progress=False)
    tokens = json.loads((Path(tiny_tree["out_dir"]) / "latents" / "probe.json").read_text())["tokens"]
    assert tokens["position"].count(0) == 3
