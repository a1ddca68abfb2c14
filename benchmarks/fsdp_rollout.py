"""On-policy sampling from an FSDP-sharded student: gather the weights once per rollout, or
sample with the sharded model (every decode step all-gathers every layer).

    python benchmarks/fsdp_rollout.py [--processes 2] [--prompts 4] [--new-tokens 32]

The student is the packaged SmolLM2-135M-Instruct, sharded over --processes CPU processes
(gloo) as `train.sharding: fsdp` shards it (each decoder layer, then the root). Each process
samples --new-tokens tokens (temperature 1, EOS masked so every process runs the same number
of forwards: the sharded mode needs that, its all-gathers are collective) for --prompts
prompts of CPython's reference prose. Rows: a plain unsharded copy (what DDP samples with),
`sharding.gathered` (what distill does), and the sharded model as it is. Median of 3
rollouts after one warm-up; the samples of every mode must be the same tokens. Weights held
during sampling are arithmetic (fp32 bytes), not measured. Run it alone on the machine.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("plain", "gathered", "sharded")
SMOL = "packaged:smollm2-135m-instruct"


def worker(args) -> None:
    from pydoc_data.topics import topics

    import torch
    import torch.distributed as dist

    from distill.models.loading import load_causal_lm, load_tokenizer
    from distill.training.rollout import Sampling, rollout
    from distill.training.sharding import decoder_layers, gathered, shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = load_causal_lm(name=SMOL, dtype="float32").eval()
    tok = load_tokenizer(SMOL)
    total = sum(p.numel() for p in model.parameters())
    layer = max(sum(p.numel() for p in m.parameters()) for m in decoder_layers(model))
    texts = [t for t in (" ".join(v.split()) for v in topics.values()) if len(t) > 400]
    prompts = [tok(texts[rank * args.prompts + i]).input_ids[:32] for i in range(args.prompts)]
    n_layers = len(decoder_layers(model))  # before sharding renames their classes
    if args.mode != "plain":
        shard(model, torch.device("cpu"), world)
    sampling = Sampling(args.new_tokens, 1.0, 0, 1.0, args.new_tokens)  # EOS masked to the end
    seeds = [1000 * rank + i for i in range(args.prompts)]

    def once():
        if args.mode == "gathered":
            with gathered(model):
                return rollout(model, prompts, sampling, tok.eos_token_id, tok.eos_token_id, seeds)
        return rollout(model, prompts, sampling, tok.eos_token_id, tok.eos_token_id, seeds)

    once()
    times, out = [], None
    for _ in range(3):
        dist.barrier()
        t0 = time.perf_counter()
        out = once()
        times.append(time.perf_counter() - t0)
    layers = layer * n_layers  # the root unit (embeddings, norm, head) stays gathered
    held = {"plain": total, "gathered": total, "sharded": (total - layers) + layers // world + layer}
    result = {"s": statistics.median(times), "completions": out.completions, "held_bytes": 4 * held[args.mode]}
    gathered_results = [None] * world
    dist.all_gather_object(gathered_results, result)
    if rank == 0:
        print("RESULT " + json.dumps(gathered_results), flush=True)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per process")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--port", type=int, default=29671)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        worker(args)
        return
    rows = {}
    for i, mode in enumerate(MODES):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes),
               "--master_port", str(args.port + i), __file__, "--mode", mode, "--prompts", str(args.prompts),
               "--new-tokens", str(args.new_tokens)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{mode}: exit {proc.returncode}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        rows[mode] = json.loads(lines[-1][len("RESULT ") :])
    same = all([r["completions"] for r in rows[m]] == [r["completions"] for r in rows["plain"]] for m in MODES)
    print(f"machine: {platform.processor() or platform.machine()}, {args.processes} gloo processes x 1 thread; "
          f"{args.prompts} prompts x {args.new_tokens} new tokens per process; same samples in every mode: {same}\n")  # fmt: skip
    print("| sampling from | s/rollout (slowest process) | vs plain | weights held per process (fp32) |\n|---|---|---|---|")
    base = max(r["s"] for r in rows["plain"])
    for mode in MODES:
        s = max(r["s"] for r in rows[mode])
        print(f"| {mode} | {s:.2f} | {base / s:.2f}x | {rows[mode][0]['held_bytes'] / 2**20:,.0f} MiB |")
    if not same:
        sys.exit("the modes sampled different tokens")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
