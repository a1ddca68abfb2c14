"""The latent page: its maths, built from two real tiny runs, driven in headless chromium."""

import copy
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
from safetensors.torch import load_file, save_file

from distill.config import build_config
from distill.errors import DistillError
from distill.report.latents import cka, pca_basis, project, ridge_map, subsample, token_classes, write_latent_page
from distill.report.page import json_for_script
from distill.training.loop import train

# ---------------------------------------------------------------- maths


def test_pca_basis_recovers_a_plane_in_10d():
    g = np.random.default_rng(1)
    q, _ = np.linalg.qr(g.normal(size=(10, 2)))  # an orthonormal plane in 10-D
    u = g.normal(size=(500, 2))
    u -= u.mean(0)
    u, _ = np.linalg.qr(u)  # centred, uncorrelated columns: the principal axes are exactly q's
    coords = u * np.array([50.0, 20.0])
    x = coords @ q.T + 7.0 + 1e-3 * g.normal(size=(500, 10))
    mean, basis, ratio = pca_basis(x)
    assert np.allclose(basis.T @ basis, np.eye(2), atol=1e-10)
    assert np.allclose(basis @ basis.T, q @ q.T, atol=1e-3)  # the same plane
    assert ratio.sum() == pytest.approx(1.0, abs=1e-4) and ratio[0] > ratio[1]
    p = project(x, mean, basis)  # coordinates up to the sign of each axis
    for j in range(2):
        c = np.corrcoef(p[:, j], coords[:, j])[0, 1]
        assert abs(c) > 0.999
    assert np.array_equal(pca_basis(x)[1], basis)  # deterministic signs


def test_ridge_map_recovers_a_known_linear_map():
    g = np.random.default_rng(2)
    s = g.normal(size=(400, 6))
    w, b = g.normal(size=(6, 9)), g.normal(size=9)
    mapped, r2 = ridge_map(s, s @ w + b, lam=1e-9)
    assert np.allclose(mapped, s @ w + b, atol=1e-6) and r2 == pytest.approx(1.0, abs=1e-9)
    _, r2_noise = ridge_map(s, g.normal(size=(400, 9)))
    assert r2_noise < 0.1  # nothing to read out of unrelated states


def test_student_equal_to_the_teacher_lands_on_the_teacher_and_cka_is_one():
    g = np.random.default_rng(3)
    t = g.normal(size=(300, 12)) @ g.normal(size=(12, 12))
    mean, basis, _ = pca_basis(t)
    assert np.array_equal(project(t.copy(), mean, basis), project(t, mean, basis))
    mapped, _ = ridge_map(t, t, lam=1e-9)
    assert np.allclose(project(mapped, mean, basis), project(t, mean, basis), atol=1e-6)
    assert cka(t, t) == pytest.approx(1.0, abs=1e-12)
    assert cka(t, 2.0 * t + 1.0) == pytest.approx(1.0, abs=1e-9)


def test_subsample_and_classes():
    assert np.array_equal(subsample(10), np.arange(10))
    a = subsample(5000)
    assert len(a) == 1500 and np.array_equal(a, subsample(5000)) and np.all(np.diff(a) > 0)
    vocab = {4: "7", 5: "+", 6: "3", 7: "="}
    tokens = {"example": [0, 0, 0, 0, 1, 1], "position": [1, 2, 3, 4, 1, 2], "token_id": [4, 5, 6, 7, 6, 4]}
    assert token_classes(tokens, vocab) == ["symbol", "3", "symbol", "end", "7", "end"]
    words = {i: f"w{i}" for i in range(20)}  # no digits: the most frequent next tokens
    tokens = {"example": [0] * 12, "position": list(range(12)), "token_id": [1, 2] * 6}
    assert token_classes(tokens, words) == ["w2", "w1"] * 5 + ["w2", "end"]


def test_json_in_the_page_cannot_break_out_of_its_script():
    text = json_for_script({"name": "</script><script>alert(1)</script>&"})
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text)["name"] == "</script><script>alert(1)</script>&"


def test_a_run_without_latents_is_an_error(tmp_path):
    run = tmp_path / "run-no-teacher"
    run.mkdir()
    with pytest.raises(DistillError, match=r"run-no-teacher.*teacher model and features\.probe_examples > 0"):
        write_latent_page([run], tmp_path / "x.html")
    assert not (tmp_path / "x.html").exists()


def test_non_finite_states_are_a_one_line_error(two_runs, tmp_path):
    run = tmp_path / "diverged"
    shutil.copytree(two_runs[0], run)
    snap = sorted((run / "latents").glob("step-*.safetensors"))[-1]
    tensors = safetensors.numpy.load_file(str(snap))
    for k in tensors:
        tensors[k][0, 0] = float("nan")
    safetensors.numpy.save_file(tensors, str(snap))
    step = int(snap.stem.split("-")[1])
    with pytest.raises(DistillError, match=rf"diverged: the student's latent states at step {step} hold NaN or inf"):
        write_latent_page([run], tmp_path / "x.html")
    assert not (tmp_path / "x.html").exists()


# ---------------------------------------------------------------- real runs in a browser


@pytest.fixture
def two_runs(tiny_tree, tmp_path):
    """A logit-only and a feature-KD tiny run (tiny_tree), snapshots at steps 0, 2, 4 and at
    0, 1, 2, 3: the runs' checkpoints differ, so the slider has to follow each run's steps."""
    runs = []
    for name, weight, every, steps in (("logit", 0.0, 2, 4), ("feat", 1.0, 1, 3)):
        tree = copy.deepcopy(tiny_tree)
        tree["data"]["n_test"] = 16
        tree["train"].update(steps=steps, checkpoint_every=every)
        tree["features"] = {"weight": weight, "probe_examples": 16}
        tree["out_dir"] = str(tmp_path / name)
        train(build_config(tree), show_progress=False)
        runs.append(tmp_path / name)
    return runs


def page_data(p) -> dict:
    return p.page.evaluate("JSON.parse(document.getElementById('latent-data').textContent)")


def plotted(p) -> list:
    return p.page.evaluate(
        "document.getElementById('latent-plot').data.slice(2).map(t => [t.name, Array.from(t.x), Array.from(t.y)])"
    )


def move_slider(p, value: int) -> None:
    p.page.evaluate(
        """v => { const s = document.getElementById('checkpoint-slider'); s.value = String(v);
        s.dispatchEvent(new Event('input', {bubbles: true})); s.dispatchEvent(new Event('change', {bubbles: true})); }""",
        value,
    )


def test_page_from_two_real_runs(two_runs, tmp_path, open_page):
    logit, feat = two_runs
    out = write_latent_page(two_runs, tmp_path / "latents.html")
    html = out.read_text()
    assert re.findall(r"<script[^>]*>", html) == ["<script>", '<script type="application/json" id="latent-data">', "<script>"]
    p = open_page(out)
    data = page_data(p)
    assert [r["label"] for r in data["runs"]] == ["logit-only (logit)", "feature KD (feat)"]
    assert [r["steps"] for r in data["runs"]] == [[0, 2, 4], [0, 1, 2, 3]]
    assert data["pair"].startswith("student layer 1 \u2194 teacher layer 1")  # the last pair by default
    assert all(0 <= c <= 1 for r in data["runs"] for c in r["cka"])
    assert set(data["classes"]) <= {*map(str, range(10)), "symbol", "end"} and len(data["classes"]) >= 5
    assert p.page.locator("#run-select option").all_text_contents() == ["logit-only (logit)", "feature KD (feat)"]
    assert p.page.get_attribute("#checkpoint-slider", "max") == "2"

    before, label0 = plotted(p), p.page.text_content("#checkpoint-label")
    assert label0.startswith("step 0") and sum(len(t[1]) for t in before) == data["n_tokens"]
    move_slider(p, 2)
    after, label2 = plotted(p), p.page.text_content("#checkpoint-label")
    assert label2.startswith("step 4") and after != before
    cka_marker = p.page.evaluate("(d => [d[d.length - 1].x[0], d[d.length - 1].y[0]])(document.getElementById('cka-plot').data)")
    assert cka_marker == [4, data["runs"][0]["cka"][2]]

    p.page.select_option("#run-select", "1")  # the feature run: its own steps, the nearest one (4 -> 3)
    assert p.page.get_attribute("#checkpoint-slider", "max") == "3"
    assert p.page.text_content("#checkpoint-label").startswith("step 3") and plotted(p) != after
    p.page.locator("#checkpoint-slider").focus()
    p.page.keyboard.press("Home")  # a real keyboard move of the range input
    assert p.page.text_content("#checkpoint-label").startswith("step 0")
    move_slider(p, 3)
    assert p.page.evaluate("document.getElementById('cka-plot').data.length") == 3  # 2 runs + the marker
    assert p.screenshot("latents.png").stat().st_size > 0
    assert p.errors == []

    with pytest.raises(DistillError, match="layer pairs 0..1"):
        write_latent_page(two_runs, tmp_path / "bad.html", pair=5)
    first = write_latent_page(two_runs, tmp_path / "pair0.html", pair=0)
    assert "student layer 0 \u2194 teacher layer 0" in first.read_text()

    other = tmp_path / "other-teacher"  # the same run, but probed on another teacher
    shutil.copytree(feat / "latents", other / "latents")
    t = load_file(str(other / "latents" / "teacher.safetensors"))
    save_file({k: v + 1.0 for k, v in t.items()}, str(other / "latents" / "teacher.safetensors"))
    with pytest.raises(DistillError, match="other-teacher: probed on another teacher"):
        write_latent_page([logit, other], tmp_path / "mixed.html")


def test_simulated_page(tmp_path, open_page):
    out = write_latent_page([], tmp_path / "sim.html", simulate=True)
    assert out.read_text() == write_latent_page([], tmp_path / "sim2.html", simulate=True).read_text()  # deterministic
    p = open_page(out)
    data = page_data(p)
    assert data["simulated"] and "simulation" in p.page.text_content("#latent-legend").lower()
    assert len(data["runs"]) == 2 and p.page.locator("#run-select option").count() == 2
    logit, feat = data["runs"]
    assert logit["kind"] == "logit-only" and feat["kind"] == "feature KD" and len(feat["steps"]) == 11
    assert feat["cka"][0] < 0.1 and feat["cka"][-1] > 0.98 and all(np.diff(feat["cka"]) > 0)  # rises to the teacher
    assert logit["cka"][-1] < 0.7 < feat["cka"][-1]
    before = plotted(p)
    move_slider(p, 10)
    assert plotted(p) != before and p.page.text_content("#checkpoint-label").startswith("step 1000")
    p.page.select_option("#run-select", "1")
    assert p.page.text_content("#checkpoint-label").startswith("step 1000")
    assert p.screenshot("latents-simulated.png").stat().st_size > 0
    assert p.errors == []


def test_the_simulation_does_not_import_the_page_module():
    """latent_sim and latents share RunStates through run_states.py: no import cycle."""
    code = "import sys, distill.report.latent_sim; assert 'distill.report.latents' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
