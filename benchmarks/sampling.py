"""One sampling draw per row from (B, V) logits: rollouts' `next_tokens` (softmax, one
running sum over the vocabulary, a search) against a two-level inverse CDF (running sums
over blocks of 256 ids, then inside the chosen block, on exp(logits - max) without
normalizing), a candidate that was measured and not adopted.

    python benchmarks/sampling.py [--repeats 500]

Both pick the first id whose running probability reaches u x total; the table gives the
median milliseconds per call over --repeats calls (the two interleaved) and the share of
2,000 draws from one row's logits on which they pick the same id (they differ only where
rounding moves an edge). Logits are bf16, as the bf16 sampling copy gives them.
"""

import argparse
import platform
import statistics
import time

import torch

from distill.training.rollout import Sampling, next_tokens

BLOCK = 256


def two_level(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The candidate: block sums pick the block, one running sum inside it picks the id."""
    x = logits.float()
    w = (x - x.amax(-1, keepdim=True)).exp_()
    rows, vocab = w.shape
    n = -(-vocab // BLOCK)
    blocks = torch.nn.functional.pad(w, (0, n * BLOCK - vocab)).view(rows, n, BLOCK)
    mass = blocks.sum(-1)
    ends = mass.cumsum(-1)
    target = (uniforms.to(ends) * ends[:, -1]).unsqueeze(-1)
    block = torch.searchsorted(ends, target).clamp(max=n - 1)
    inside = target - (ends.gather(-1, block) - mass.gather(-1, block))
    running = blocks.gather(1, block.unsqueeze(-1).expand(rows, 1, BLOCK)).squeeze(1).cumsum(-1)
    column = torch.searchsorted(running, torch.minimum(inside, running[:, -1:])).clamp(max=BLOCK - 1)
    return (block * BLOCK + column).squeeze(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=500)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| rows x vocabulary | next_tokens (ms) | two-level (ms) | speed-up | same id |\n|---|---|---|---|---|")
    sampling = Sampling(1, 1.0)
    for rows, vocab in ((4, 49152), (8, 151936)):
        g = torch.Generator().manual_seed(0)
        logits = (torch.randn(rows, vocab, generator=g) * 3).bfloat16()
        u = torch.rand(rows, dtype=torch.float64, generator=g)
        times = {"ours": [], "candidate": []}
        for _ in range(args.repeats):
            for name, draw in (("ours", lambda x, v: next_tokens(x, v, sampling)), ("candidate", two_level)):
                t = time.perf_counter()
                draw(logits, u)
                times[name].append(time.perf_counter() - t)
        many = torch.rand(2000, dtype=torch.float64, generator=g)
        row = logits[:1].expand(len(many), -1)
        same = (next_tokens(row, many, sampling) == two_level(row, many)).double().mean().item()
        ours, candidate = (1e3 * statistics.median(times[k]) for k in ("ours", "candidate"))
        print(f"| {rows} x {vocab:,} | {ours:.3f} | {candidate:.3f} | {ours / candidate:.2f}x | {100 * same:.2f}% |")


if __name__ == "__main__":
    main()
