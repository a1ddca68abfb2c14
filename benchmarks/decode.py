"""The on-policy rollout alone: how the student decodes, lever by lever, on the real pair.

    python benchmarks/decode.py --work runs/bench-on-policy

The student and prompts of benchmarks/on_policy.py (SmolLM2-135M-Instruct's 10-layer
layer-drop student, 64M parameters; 4 prompts of 48 tokens of CPython's reference prose),
64 new tokens forced (EOS masked), temperature 1, the same row seeds for every variant.
For each sampling dtype (float32: the student's weights; bfloat16: on_policy.sample_dtype's
copy), each variant rolls out --repeats times (variants interleaved) and the table shows
the median seconds per rollout:

    dynamic cache      today's default (a DynamicCache that grows each step)
    static cache       a StaticCache of the prompts' width + 64 slots rounded up to each of
                       --buckets, the step uncompiled
    static + compiled  the same with the decode step compiled (on_policy.compile_decode:
                       bucket 64)
    fused projections  the dynamic path with q/k/v and gate/up each computed by one matmul
                       (a benchmark-only patch of a copy of the model: `fuse_projections`)

`compile s` is what the first compiled rollout cost beyond a timed one; `rows as dynamic`
counts the rows whose 64 sampled tokens equal the dynamic cache's (float rounding decides
the others: a draw that falls on a boundary of the CDF).
"""

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distill.models.loading import load_causal_lm, load_tokenizer
from distill.training.on_policy import Sampler
from distill.training.rollout import Sampling, StaticDecode, rollout

SMOL = "packaged:smollm2-135m-instruct"


class _FusedGroup:
    """Several linears of one input as one matmul: the first call with a tensor computes all
    of them, the others slice that result (the attention calls q, k and v on the same tensor,
    the MLP gate and up)."""

    def __init__(self, linears: list[torch.nn.Linear]):
        self.weight = torch.cat([lin.weight for lin in linears]).detach()
        self.bias = torch.cat([lin.bias for lin in linears]).detach() if linears[0].bias is not None else None
        self.input, self.output = None, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self.input:
            self.input, self.output = x, F.linear(x, self.weight, self.bias)
        return self.output


class _Slice(torch.nn.Module):
    def __init__(self, group: _FusedGroup, lo: int, hi: int):
        super().__init__()
        self.group, self.lo, self.hi = group, lo, hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group(x)[..., self.lo : self.hi]


def fuse_projections(model):
    """A copy of a llama-family model whose q/k/v and gate/up projections share one matmul each."""
    model = copy.deepcopy(model)
    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj")), (layer.mlp, ("gate_proj", "up_proj"))):
            linears = [getattr(parent, n) for n in names]
            group, lo = _FusedGroup(linears), 0
            for name, lin in zip(names, linears):
                setattr(parent, name, _Slice(group, lo, lo + lin.out_features))
                lo += lin.out_features
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/bench-on-policy"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--buckets", type=int, nargs="+", default=[64, 512],
                    help="static caches rounded up to these multiples (64: on_policy.compile_decode's)")  # fmt: skip
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    args = ap.parse_args()
    from on_policy import prepare  # benchmarks/on_policy.py: the same student and prompts

    paths = prepare(args.work, 64 * args.batch, 48)
    tok = load_tokenizer(SMOL)
    rows = [json.loads(line) for line in Path(paths["prompts"]).read_text().splitlines()][: args.batch]
    prompts = [tok(r["prompt"], add_special_tokens=False).input_ids for r in rows]
    student = load_causal_lm(name=paths["student"], dtype="float32")
    sampling = Sampling(args.new_tokens, 1.0, min_new_tokens=args.new_tokens)
    seeds = list(range(args.batch))
    print(f"rollout of {args.batch} x {args.new_tokens} tokens, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"median of {args.repeats}\n")  # fmt: skip
    print("| sampling dtype | decode | s/rollout | ms/token step | vs dynamic | compile s | rows as dynamic |")
    print("|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        model = Sampler(dtype, keep_copy=True)(student)
        fused = fuse_projections(model)

        def run(m, static=None):
            return lambda: rollout(m, prompts, sampling, tok.eos_token_id, tok.pad_token_id, seeds, static=static)

        variants = {"dynamic cache": run(model)}
        for bucket in args.buckets:
            slots = StaticDecode(bucket).length(max(map(len, prompts)), args.new_tokens)
            variants[f"static cache, {slots} slots"] = run(model, StaticDecode(bucket, compiled=False))
            variants[f"static + compiled, {slots} slots"] = run(model, StaticDecode(bucket))
        variants["fused projections"] = run(fused)
        first, times, outs = {}, {k: [] for k in variants}, {}
        for name, run in variants.items():  # untimed first call: the compile, allocator warm-up
            t = time.perf_counter()
            outs[name] = run()
            first[name] = time.perf_counter() - t
        for _ in range(args.repeats):
            for name, run in variants.items():
                t = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t)
        base = statistics.median(times["dynamic cache"])
        for name, ts in times.items():
            med = statistics.median(ts)
            same = sum(a == b for a, b in zip(outs[name].completions, outs["dynamic cache"].completions))
            compile_s = f"{first[name] - med:.1f}" if "compiled" in name else "-"
            print(f"| {dtype} | {name} | {med:.3f} | {1000 * med / args.new_tokens:.1f} | {base / med:.2f}x | {compile_s} "
                  f"| {same}/{args.batch} |")  # fmt: skip


if __name__ == "__main__":
    main()
