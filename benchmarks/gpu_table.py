"""The prepared single-GPU check (benchmarks/gpu.sh runs it): one table, targets beside it.

    python benchmarks/gpu_table.py --trl-python PY      # on a CUDA machine (gpu.sh sets PY up)
    python benchmarks/gpu_table.py --dry                # CPU: the same code paths at toy shapes

Rows, each measured in its own process:
  * the lm_head matmul bound at N=8192, Hs=2048, Ht=4096, V=128256 (bf16): 2*N*V*(3*Hs + Ht)
    FLOPs at the rate of (N, Hs) @ (Hs, V) matmuls measured in the same run;
  * distill's fused loss (generalized JSD, beta 0.5) and Liger-Kernel's LigerFusedLinearJSD at
    that shape, forward + backward, median of 5 after a warm-up; peak: CUDA memory allocated
    above the inputs (benchmarks/kd_loss.py's worker);
  * one on-policy step (rollout + teacher scoring + update; batch 8, 256 new tokens forced,
    random-init Qwen2.5-1.5B teacher / 0.5B student shapes, bf16): distill, TRL GKDTrainer
    and TRL DistillationTrainer, median of 3 steps after 1 warm-up (benchmarks/on_policy.py).

Targets (issue 20): fused loss <= 1.5x the matmul bound and <= 1.5 GiB at that shape (Liger:
about 2.0x and 2.0 GiB); on-policy step <= 1.5 s and <= 7 GiB (TRL's best: 4.7 s, 7.3 GiB).
--dry runs every row's code on CPU at toy shapes (fp32; Liger and TRL rows say why they do
not run) and checks the table is produced: it measures nothing worth quoting.
"""

import argparse
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import kd_loss
import on_policy

SHAPE = (8192, 2048, 4096, 128256)
DRY_SHAPE = (64, 32, 48, 512)
GIB = 2**30
TARGETS = {
    "fused": "<= 1.5x bound, <= 1.5 GiB",
    "liger": "(peer: about 2.0x, 2.0 GiB)",
    "distill step": "<= 1.5 s, <= 7 GiB",
    "gkd": "(peer: best 4.7 s, 7.3 GiB)",
    "distillation": "(peer)",
}


def loss_rows(dry: bool) -> tuple[float | None, list[tuple[str, dict]]]:
    """(the matmul bound in ms, [(impl, kd_loss worker result)])."""
    shape = DRY_SHAPE if dry else SHAPE
    base = {"device": "cpu" if dry else "cuda", "dtype": "float32" if dry else "bfloat16", "reps": 5,
            "chunk_size": None, "shape": shape, "divergence": "jsd"}  # fmt: skip
    rate = kd_loss.run_worker({**base, "impl": "matmul"})
    n, hs, ht, v = shape
    bound = 2 * n * v * (3 * hs + ht) / rate["flops_per_s"] * 1e3 if "flops_per_s" in rate else None
    return bound, [(impl, kd_loss.run_worker({**base, "impl": impl})) for impl in ("fused", "liger")]


def step_rows(dry: bool, trl_python: str | None, work: Path) -> list[dict]:
    argv = ["--work", str(work), "--steps", "1" if dry else "3", "--warmup", "1", "--trl", "gkd", "distillation"]
    argv += ["--tiny", "--batch", "2", "--new-tokens", "8"] if dry else ["--gpu", "--batch", "8", "--new-tokens", "256"]
    argv += ["--trl-python", trl_python] if trl_python else []
    return on_policy.measure(on_policy.parser().parse_args(argv))


def table(bound: float | None, losses: list[tuple[str, dict]], steps: list[dict], dry: bool, trl_python) -> list[str]:
    n, hs, ht, v = DRY_SHAPE if dry else SHAPE
    lines = ["| row | time | x bound | peak | target |", "|---|---|---|---|---|"]
    lines.append(f"| lm_head matmul bound, N={n} Hs={hs} Ht={ht} V={v} | "
                 f"{f'{bound:.1f} ms' if bound else 'not measured'} | 1.00x | - | - |")  # fmt: skip
    names = {"fused": "distill fused loss (JSD), fwd + bwd", "liger": "Liger LigerFusedLinearJSD, fwd + bwd"}
    for impl, r in losses:
        if "ms" not in r:
            lines.append(f"| {names[impl]} | {r.get('skipped', 'failed')} | - | - | {TARGETS[impl]} |")
            continue
        x = f"{r['ms'] / bound:.2f}x" if bound else "-"
        lines.append(f"| {names[impl]} | {r['ms']:.1f} ms | {x} | {r['peak_bytes'] / GIB:.2f} GiB | {TARGETS[impl]} |")
    for r in steps:
        label = r.get("label", r.get("trainer", "?"))
        name = {"distill": "distill on-policy step", "gkd": "TRL GKDTrainer step", "distillation": "TRL DistillationTrainer step"}
        target = TARGETS["distill step" if label == "distill" else label]
        if "error" in r:
            lines.append(f"| {name.get(label, label)} | {r['error']} | - | - | {target} |")
            continue
        peak = r.get("peak_gpu_gib") or r["peak_rss_gib"]
        where = "GPU" if r.get("peak_gpu_gib") else "RSS"
        lines.append(f"| {name.get(label, label)} | {r['s_per_step']:.2f} s | - | {peak:.2f} GiB {where} | {target} |")
    if not trl_python or dry:
        lines.append(f"| TRL rows | {'not run in a dry run' if dry else 'not run: no --trl-python'} | - | - | - |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="CPU, toy shapes: check the setup, measure nothing to quote")
    ap.add_argument("--trl-python", help="a python with trl installed (gpu.sh's benchmark environment)")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-gpu"))
    args = ap.parse_args()
    import torch

    if not args.dry and not torch.cuda.is_available():
        sys.exit("gpu_table.py: torch.cuda.is_available() is False; run on a CUDA machine, or --dry to check the setup")
    device = f"{platform.processor() or platform.machine()} (dry run, CPU)" if args.dry else torch.cuda.get_device_name()
    bound, losses = loss_rows(args.dry)
    steps = step_rows(args.dry, args.trl_python, args.work)
    print(f"\ngpu check: {device}, torch {torch.__version__}{', DRY RUN: toy shapes, nothing to quote' if args.dry else ''}\n")
    print("\n".join(table(bound, losses, steps, args.dry, args.trl_python)))


if __name__ == "__main__":
    main()
