"""Fused chunked KD loss (`distill.loss.fused.fused_kd_loss`) vs the naive full-logits path.

    python benchmarks/kd_loss.py                                   # CPU, default shapes, all divergences
    python benchmarks/kd_loss.py --shape 2048,576,576,49152 --divergence forward_kl jsd
    python benchmarks/kd_loss.py --gpu                             # CUDA + bf16, adds the big shapes

Every measurement (one divergence x shape x impl, and each matmul-rate probe) runs in a
FRESH subprocess, so peak memory is not polluted by earlier runs:
  * CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() right after the
    inputs were built (so: everything the loss + backward allocates, grads included).
  * CPU: getrusage(RUSAGE_SELF).ru_maxrss (process high-water RSS) at the end minus the
    same high-water mark right after the inputs were built. This is resident memory as
    the OS sees it (allocator caching included), so it is an upper-bound-ish, honest
    "extra RSS", not a tensor-level count.
Time is forward + backward, median of --reps runs after one warm-up. "x bound" is the
time divided by the lm_head matmul bound 2*N*V*(3*Hs + Ht) FLOPs at the matmul rate
measured in the same run (median of (N, Hs) @ (Hs, V) matmuls in the same dtype). Naive
runs whose estimated need exceeds free memory (a per-divergence count of live (N, V) fp32
tensors, see NAIVE_FP32_COPIES) are measured at N/2, N/4, ... instead and scaled linearly
back to N (every naive buffer is (N, V)); such rows are labelled 'naive~' and say so.
On CPU every worker first sets glibc's malloc as a CPU training run does
(distill.training.host_memory), whatever the impl.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from distill.loss.registry import DIVERGENCES as REGISTRY

CPU_SHAPES = [(2048, 576, 576, 49152), (4096, 1024, 2048, 128256)]
GPU_SHAPES = [(8192, 2048, 4096, 128256), (16384, 1024, 2048, 262144)]
# Every registered divergence at its default parameters (jsd: beta 0.5; skew KLs: alpha 0.1).
DIVERGENCES = {name: spec.defaults() for name, spec in REGISTRY.items()}
# Rough number of (N, V) fp32 tensors the naive path keeps alive at its peak (logits,
# log-softmaxes, exp, saved-for-backward intermediates, gradient buffers).
NAIVE_FP32_COPIES = {
    "forward_kl": 10,
    "reverse_kl": 10,
    "tvd": 8,
    "jsd": 20,
    "skew_forward_kl": 16,
    "skew_reverse_kl": 16,
}
GIB = 1024**3


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, device: str, reps: int) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _free_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"]


def worker(spec: dict) -> dict:
    """One measurement in this (fresh) process; returns a JSON-able result row."""
    import torch

    from distill.loss.divergences import divergence
    from distill.loss.fused import fused_kd_loss

    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    if device == "cpu":  # as a CPU training run sets it (distill.training.host_memory), for every impl
        from distill.training.host_memory import keep_freed_memory

        keep_freed_memory()
    n, hs_dim, ht_dim, v = spec["shape"]
    reps = spec["reps"]
    gen = torch.Generator(device=device).manual_seed(0)
    if spec["impl"] == "matmul":
        a = torch.randn(n, hs_dim, device=device, dtype=dtype, generator=gen)
        b = torch.randn(hs_dim, v, device=device, dtype=dtype, generator=gen)
        ms = _median_ms(lambda: a @ b, device, reps)
        return {"flops_per_s": 2 * n * hs_dim * v / (ms / 1e3)}

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=device, generator=gen) * scale).to(dtype)

    hs = rand(n, hs_dim).requires_grad_(True)  # (N, Hs)
    ws = rand(v, hs_dim, scale=hs_dim**-0.5).requires_grad_(True)  # (V, Hs)
    ht, wt = rand(n, ht_dim), rand(v, ht_dim, scale=ht_dim**-0.5)  # (N, Ht), (V, Ht)
    mask = torch.rand(n, device=device, generator=gen) > 0.1  # (N,) ~90% valid
    name, params = spec["divergence"], DIVERGENCES[spec["divergence"]]

    if spec["impl"] == "naive":
        need = n * v * (4 * NAIVE_FP32_COPIES[name] + 2 * dtype.itemsize)
        if need > _free_bytes(device):
            return {"skipped": f"OOM (skipped, needs {need / GIB:.1f} GiB)"}

        def step() -> None:
            hs.grad = ws.grad = None
            s = hs @ ws.T  # (N, V)
            with torch.no_grad():
                t = ht @ wt.T  # (N, V)
            divergence(name, s, t, mask, 1.0, **params).backward()
    elif spec["impl"] == "liger":  # Liger-Kernel's fused linear JSD (benchmark-only peer; CUDA / Triton)
        try:
            from liger_kernel.transformers import LigerFusedLinearJSD
        except ImportError:
            return {"skipped": "liger-kernel not installed"}
        if device != "cuda":
            return {"skipped": "Liger's Triton kernels need CUDA"}
        liger = LigerFusedLinearJSD(jsd_beta=params.get("beta", 0.5), temperature=1.0)
        labels = torch.where(mask, 0, -100)  # (N,): only its ignore_index positions matter

        def step() -> None:
            hs.grad = ws.grad = None
            liger(hs, ws, ht, wt, labels).backward()
    else:

        def step() -> None:
            hs.grad = ws.grad = None
            fused_kd_loss(hs, ws, ht, wt, mask, divergence=name, chunk_size=spec["chunk_size"], **params).backward()

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    try:
        ms = _median_ms(step, device, reps)
    except torch.OutOfMemoryError:
        return {"skipped": "OOM (ran out of memory)"}
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"ms": ms, "peak_bytes": peak}


def run_worker(spec: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"skipped": f"failed rc={proc.returncode}: {tail[:80]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_naive(spec: dict) -> dict:
    """The naive row; if it cannot fit, measure it at N/2, N/4, ... and scale time and memory
    linearly in N (every naive buffer is (N, V), so both are linear), marked 'naive~'."""
    n, *rest = spec["shape"]
    r = run_worker({**spec, "impl": "naive"})
    m = n
    while "skipped" in r and r["skipped"].startswith("OOM") and m > 256:
        m //= 2
        r = run_worker({**spec, "shape": (m, *rest), "impl": "naive"})
    if m != n and "ms" in r:
        r = {"ms": r["ms"] * n / m, "peak_bytes": r["peak_bytes"] * n / m, "scaled_from": m}
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", help="N,Hs,Ht,V (repeatable); default per device")
    parser.add_argument("--divergence", nargs="+", default=list(DIVERGENCES), choices=list(DIVERGENCES))
    parser.add_argument("--gpu", action="store_true", help="CUDA + bf16; adds the large GPU shapes")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: distill.loss.fused.auto_chunk_size(V)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    device, dtype = ("cuda", "bfloat16") if args.gpu else ("cpu", "float32")
    if args.shape:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape]
    else:
        shapes = CPU_SHAPES + (GPU_SHAPES if args.gpu else [])
    print(f"device={device} dtype={dtype} reps={args.reps} chunk_size={args.chunk_size} "
          f"memory={'cuda max_memory_allocated' if args.gpu else 'fresh-subprocess ru_maxrss delta'}")  # fmt: skip
    header = f"{'divergence':<16} {'shape (N,Hs,Ht,V)':<26} {'impl':<6} {'time ms':>10} {'peak MiB':>10} "
    header += f"{'t/naive':>8} {'mem/naive':>9} {'x bound':>8}"
    print(header)
    print("-" * len(header))
    base = {"device": device, "dtype": dtype, "reps": args.reps, "chunk_size": args.chunk_size}
    for shape in shapes:
        n, hs_dim, ht_dim, v = shape
        rate = run_worker({**base, "shape": shape, "impl": "matmul"})
        bound_ms = 2 * n * v * (3 * hs_dim + ht_dim) / rate["flops_per_s"] * 1e3 if "flops_per_s" in rate else None
        rate_txt = f"{rate['flops_per_s'] / 1e9:.0f} GFLOP/s" if bound_ms else rate.get("skipped")
        print(f"# shape {shape}: matmul rate {rate_txt}, lm_head bound {bound_ms or float('nan'):.0f} ms")
        for name in args.divergence:
            spec = {**base, "shape": shape, "divergence": name}
            rows = {"naive": run_naive(spec), "fused": run_worker({**spec, "impl": "fused"})}
            ref = rows["naive"]
            for impl, r in rows.items():
                label = f"{name:<16} {str(shape):<26} {impl:<6} "
                if "skipped" in r:
                    print(label + r["skipped"])
                    continue
                if "scaled_from" in r:
                    label = f"{name:<16} {str(shape):<26} {'naive~':<6} "
                t_ratio = f"{r['ms'] / ref['ms']:.2f}" if "ms" in ref else "-"
                m_ratio = f"{r['peak_bytes'] / ref['peak_bytes']:.3f}" if "peak_bytes" in ref else "-"
                x_bound = f"{r['ms'] / bound_ms:.2f}" if bound_ms else "-"
                mib = r["peak_bytes"] / 2**20
                note = f"  (measured at N={r['scaled_from']}, scaled x{n // r['scaled_from']})" if "scaled_from" in r else ""
                print(label + f"{r['ms']:>10.1f} {mib:>10.0f} {t_ratio:>8} {m_ratio:>9} {x_bound:>8}{note}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
