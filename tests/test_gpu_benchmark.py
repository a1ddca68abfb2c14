"""benchmarks/gpu.sh: its dry mode runs every row's code on CPU and prints the table with the
targets; on a machine without CUDA the real mode stops at once, saying why."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "gpu.sh"


def _run(*args, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600, check=False)


@pytest.mark.slow
def test_dry_mode_runs_every_row_and_prints_the_targets(tmp_path):
    proc = _run("--dry", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert "DRY RUN" in proc.stdout
    assert " ms " in rows["distill fused loss (JSD), fwd + bwd"] and "<= 1.5x bound, <= 1.5 GiB" in proc.stdout
    assert " s " in rows["distill on-policy step"] and "<= 1.5 s, <= 7 GiB" in proc.stdout
    assert "x bound" in proc.stdout and rows["lm_head matmul bound, N=64 Hs=32 Ht=48 V=512"].count("ms") == 1
    assert "Liger LigerFusedLinearJSD, fwd + bwd" in rows and "TRL rows" in rows


def test_without_cuda_the_real_mode_stops_with_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the real mode would run")
    proc = _run(tmp_path=tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0
    assert "no CUDA torch" in proc.stderr
    assert not (SCRIPT.parent / ".gpu-venv").exists()
    bad = _run("--fast", tmp_path=tmp_path)
    assert bad.returncode == 2 and "unknown argument --fast" in bad.stderr
