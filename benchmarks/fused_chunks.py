"""The fused loss on CPU by chunk size, with and without the host-memory setting.

    python benchmarks/fused_chunks.py --repeats 2

One fused forward-KL loss + backward at the real step's shape (1024 tokens, student and
teacher width 576, V 49152; a bf16 teacher head, as with teacher.dtype: bfloat16; the
student's lm_head frozen, as with train.freeze_embeddings), per chunk size, with glibc's
default malloc and with `distill.training.host_memory.keep_freed_memory`. Each cell runs in
a fresh process: median ms and minor page faults of calls 3 to 7. --repeats runs the whole
grid again, interleaved, and pools the calls. Run it alone on the machine.
"""

import argparse
import itertools
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

SHAPE = (1024, 576, 49152)


def worker(chunk: int, keep: bool) -> dict:
    import torch

    from distill.loss.fused import fused_kd_loss
    from distill.training.host_memory import keep_freed_memory

    if keep:
        keep_freed_memory()
    n, h, v = SHAPE
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(n, h, generator=g).requires_grad_(True)  # (N, H)
    ws = torch.randn(v, h, generator=g) * h**-0.5  # (V, H) frozen
    ht, wt = torch.randn(n, h, generator=g).bfloat16(), (torch.randn(v, h, generator=g) * h**-0.5).bfloat16()
    mask = torch.ones(n, dtype=torch.bool)
    ms, faults = [], []
    for _ in range(7):
        before, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        fused_kd_loss(hs, ws, ht, wt, mask, divergence="forward_kl", chunk_size=chunk).backward()
        ms.append((time.perf_counter() - t0) * 1e3)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        hs.grad = None
    return {"ms": ms[2:], "faults": faults[2:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, nargs="+", default=[682, 170, 85, 42], help="tokens per chunk (682: 2**25 logits, 170: 2**23)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(**json.loads(args.worker))))
        return
    cells: dict[tuple[int, bool], dict] = {}
    for _, chunk, keep in itertools.product(range(args.repeats), args.chunks, (False, True)):
        spec = json.dumps({"chunk": chunk, "keep": keep})
        out = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True, check=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        cell = cells.setdefault((chunk, keep), {"ms": [], "faults": []})
        cell["ms"] += got["ms"]
        cell["faults"] += got["faults"]
    n, h, v = SHAPE
    print(f"{platform.processor() or platform.machine()}, fused forward KL + backward, N={n} H={h} V={v}, {args.repeats} run(s)\n")
    print("| chunk (tokens) | buffer MiB | malloc | ms | page faults a call |")
    print("|---|---|---|---|---|")
    for (chunk, keep), cell in cells.items():
        mib = chunk * v * 4 / 2**20
        print(f"| {chunk} | {mib:.0f} | {'kept (host_memory)' if keep else 'glibc default'} | "
              f"{statistics.median(cell['ms']):,.0f} | {statistics.median(cell['faults']):,.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
