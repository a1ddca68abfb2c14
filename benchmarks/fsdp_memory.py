"""What each process holds with the real pair over 2 CPU processes: DDP vs FSDP2 vs FSDP2
with the teacher sharded.

    python benchmarks/fsdp_memory.py [--work runs/bench-fsdp-memory] [--steps 3]

SmolLM2-135M-Instruct (fp32) teaches its 10-layer layer-drop student (64M parameters) on
packed prose, 2 gloo processes x 1 micro-batch of 2 blocks of 256 tokens, AdamW, logit KD
on the fused path, each setting in its own torchrun launch (`distill train`'s own setup and
step). Per process, after --steps steps: the bytes of the student's weights and optimizer
state this process holds (its gradients, freed after each step, are as large as its
trained weights) (DTensor shards counted by their local part), the
teacher's weights it holds (the gathered root unit of a sharded teacher included), and its
resident memory (RSS now and the peak, which includes loading the whole models before they
are sharded). The losses of the three settings must agree (same steps). Memory is not
affected by other work on the machine; s/step is, and is not reported.

The processes run with MALLOC_MMAP_THRESHOLD_=1 MiB: glibc's default raises its mmap
threshold after large frees (up to 32 MiB), so the layer buffers FSDP gathers and frees are
kept in the heap afterwards and RSS stops showing what sharding saves (--malloc-default shows
that). The tensor columns do not depend on it.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
SETTINGS = {"DDP (sharding: none)": ("none", "replicate"), "FSDP2": ("fsdp", "replicate"), "FSDP2 + teacher sharded": ("fsdp", "shard")}
MIB = 2**20


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if isinstance(t, DTensor) else t
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def worker(tree: dict, steps: int) -> None:
    import torch
    import torch.distributed as dist

    from distill.config import build_config
    from distill.training.setup import setup
    from distill.training.step import train_step

    torch.set_num_threads(1)
    run = setup(build_config(tree), resume=False)
    losses = [train_step(run, s)[0]["loss"] for s in range(steps)]
    student = list(run.student.parameters())
    state = [v for entry in run.optimizer.state.values() for v in entry.values() if isinstance(v, torch.Tensor)]
    held = {
        "student_weights": local_bytes(student),
        "optimizer": local_bytes(state),
        "teacher": local_bytes(run.teacher.model.parameters()),
        "rss_now": int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE"),
        "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "losses": losses,
    }
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, held)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(everyone), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/bench-fsdp-memory"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--port", type=int, default=29681)
    ap.add_argument("--malloc-default", action="store_true", help="leave glibc's dynamic mmap threshold on (see above)")
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tree:
        worker(json.loads(args.tree), args.steps)
        return
    import real_llm

    from distill.models.students import make_student

    args.work.mkdir(parents=True, exist_ok=True)
    student = args.work / "student10"
    if not (student / "student.json").exists():
        make_student(real_llm.SMOL, student, layers=10)
    rows = {}
    for i, (label, (sharding, teacher_sharding)) in enumerate(SETTINGS.items()):
        out = args.work / f"run-{i}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        tree = {
            "student": {"name": str(student)}, "teacher": {"name": real_llm.SMOL},
            "data": {"source": str(real_llm.training_rows(args.work)), "max_length": 256, "packing": True},
            "objective": {"alpha": 1.0, "temperature": 1.0},
            "train": {"steps": args.steps, "micro_batch_size": 2, "lr": 1e-4, "warmup_steps": 1, "fused_optimizer": True,
                      "sharding": sharding, "teacher_sharding": teacher_sharding},
            "features": {"probe_examples": 0}, "out_dir": str(out),
        }  # fmt: skip
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(args.port + i),
               __file__, "--tree", json.dumps(tree), "--steps", str(args.steps)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if not args.malloc_default:
            env["MALLOC_MMAP_THRESHOLD_"] = str(MIB)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{label}: exit {proc.returncode}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        rows[label] = json.loads(lines[-1][len("RESULT ") :])
    first = next(iter(rows.values()))[0]["losses"]
    agree = max(abs(a - b) for r in rows.values() for a, b in zip(r[0]["losses"], first))
    print(f"machine: {platform.processor() or platform.machine()}, 2 gloo processes x 1 thread; {args.steps} steps; "
          f"largest loss difference between settings: {agree:.1e}\n")  # fmt: skip
    print("| setting | student weights | AdamW state | teacher weights | RSS now | peak RSS |")
    print("|---|---|---|---|---|---|")
    for label, per_rank in rows.items():
        r = max(per_rank, key=lambda x: x["rss_now"])  # the larger process
        cells = [f"{r[k] / MIB:,.0f} MiB" for k in ("student_weights", "optimizer", "teacher", "rss_now", "rss_peak")]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
