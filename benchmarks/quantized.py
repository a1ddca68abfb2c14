"""Deployable recipe students: fp32 vs int8 vs int4 post-training vs int4 quantization-aware.

    python benchmarks/real_llm.py --work WORK --runs depth:recipe --train-text reference+docstrings \\
        --tag @frozen --recipe RECIPE.yaml --seeds 0 1 2            # the fp32 students
    python benchmarks/real_llm.py ... --tag @qat --recipe RECIPE_WITH_QUANT.yaml  # optional: QAT
    python benchmarks/quantized.py --work WORK --tag @frozen [--qat-tag @qat] --seeds 0 1 2

Issue 19 item 5 on the real-LLM recipe's SmolLM2 students. For each seed, the fp32 student
of the recipe run `WORK/runs/depth-recipe<tag>-s<seed>-200` and `distill quantize` of it
(int8 weight-only, one scale per row; int4 weight-only, one scale per 32 weights, lm_head
and embeddings in full precision); with --qat-tag, the quantized export (`student-int4/`)
of a quantization-aware run of the same recipe, init, data and seed (`quant: {scheme: int4,
aware: true}`: same steps). Every model is scored as benchmarks/real_llm.py scores the
recipe (held-out IDLE help and licence texts: forward KL to the teacher, top-1 agreement,
perplexity), with the size of its weights on disk and greedy CPU decode tokens/s (batch 1,
KV cache). Paired over seeds: int8 - fp32, int4 - fp32, and QAT int4 - post-training int4,
each with its 95% interval. Run it alone on the machine (decode speed).
"""

import argparse
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import real_llm  # the held-out texts, the scores and the teacher's name
from quantize_smollm2 import decode_tokens_per_s, weights_bytes


def folders_of(work: Path, tag: str, qat_tag: str | None, seed: int, steps: int) -> dict[str, Path]:
    """The seed's model folders, quantizing the fp32 student where not done yet."""
    from distill.models.quantize import Scheme
    from distill.models.quantized_io import is_quantized_folder, quantize_folder

    run = work / "runs" / f"depth-recipe{tag.replace('@', '-')}-s{seed}-{steps}"
    if not (run / "student").is_dir():
        sys.exit(f"{run}/student not found: train the fp32 recipe students first (benchmarks/real_llm.py, see --help)")
    folders = {"fp32": run / "student"}
    for scheme in ("int8", "int4"):
        out = work / "quantized" / f"{run.name}-{scheme}"
        if not is_quantized_folder(out):
            quantize_folder(run / "student", out, Scheme(scheme, 32))
        folders[f"{scheme} post-training"] = out
    if qat_tag:
        qat = work / "runs" / f"depth-recipe{qat_tag.replace('@', '-')}-s{seed}-{steps}" / "student-int4"
        if not is_quantized_folder(qat):
            sys.exit(f"{qat} not found: run the quantization-aware recipe first (benchmarks/real_llm.py --tag {qat_tag})")
        folders["int4 quantization-aware"] = qat
    return folders


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="benchmarks/real_llm.py's work folder")
    ap.add_argument("--tag", default="", help="the fp32 recipe runs' tag in real_llm.py")
    ap.add_argument("--qat-tag", help="the quantization-aware recipe runs' tag (their quant: int4, aware)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--decode-tokens", type=int, default=64)
    args = ap.parse_args()

    from distill.eval.paired import paired_difference
    from distill.models.loading import load_causal_lm, load_tokenizer

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    teacher = load_causal_lm(name=real_llm.SMOL, dtype="float32").eval()
    tokenizer = load_tokenizer(real_llm.SMOL)
    tokenizer.padding_side = "right"
    held = real_llm.heldout_texts()
    rows: dict[str, dict[int, dict]] = {}
    for seed in args.seeds:
        for name, folder in folders_of(args.work, args.tag, args.qat_tag, seed, args.steps).items():
            model = load_causal_lm(str(folder)).eval()
            row = {**real_llm.heldout_scores(model, teacher, tokenizer, held), "bytes": weights_bytes(folder),
                   "decode": decode_tokens_per_s(model, tokenizer, args.decode_tokens)}  # fmt: skip
            rows.setdefault(name, {})[seed] = row
            print(f"seed {seed} {name}: KL {row['kl']:.4f} top-1 {100 * row['top1']:.1f}% ppl {row['ppl']:.1f} "
                  f"{row['bytes'] / 2**20:.1f} MiB {row['decode']:.1f} tok/s", flush=True)  # fmt: skip

    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else float("nan")
    print("\n| model | seeds | forward KL | top-1 agreement | perplexity | weights on disk | decode tok/s |")
    print("|---|---|---|---|---|---|---|")
    for name, by_seed in rows.items():
        r = list(by_seed.values())
        kl, top, ppl = [x["kl"] for x in r], [100 * x["top1"] for x in r], [x["ppl"] for x in r]
        print(f"| {name} | {len(r)} | {statistics.fmean(kl):.4f} ± {sd(kl):.4f} | {statistics.fmean(top):.1f} ± {sd(top):.1f}% "
              f"| {statistics.fmean(ppl):.1f} ± {sd(ppl):.1f} | {statistics.fmean(x['bytes'] for x in r) / 2**20:.1f} MiB "
              f"| {statistics.median(x['decode'] for x in r):.1f} |")  # fmt: skip
    print("\n| paired difference in forward KL | per seed | mean [95% CI] |\n|---|---|---|")
    pairs = [("int8 post-training", "fp32"), ("int4 post-training", "fp32"), ("int4 quantization-aware", "int4 post-training")]
    for a, b in pairs:
        if a in rows and b in rows and len(args.seeds) >= 2:
            d = paired_difference([rows[a][s]["kl"] for s in args.seeds], [rows[b][s]["kl"] for s in args.seeds])
            per = ", ".join(f"{rows[a][s]['kl'] - rows[b][s]['kl']:+.4f}" for s in args.seeds)
            print(f"| {a} - {b} | {per} | {d.format(4)} |")


if __name__ == "__main__":
    main()
