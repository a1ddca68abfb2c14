"""Post-training quantization on the packaged SmolLM2-135M-Instruct: fp32 vs int8 vs int4.

    python benchmarks/quantize_smollm2.py [--layers 20] [--rows 24] [--max-length 128]
                                          [--group-size 32] [--decode-tokens 32]

For two students of the SmolLM2 teacher, the teacher itself (a trained model: its
full-precision KL to the teacher is 0, so a quantized copy's KL is what quantization costs)
and its layer-drop student (`distill student --layers N`, untrained after the drop), each in
full precision and quantized by `distill quantize` (int8 weight-only; int4 weight-only, one
scale per --group-size weights): held-out forward KL(teacher || model) per token on CPython
standard-library docstrings, top-1 agreement, perplexity, size of the weights on disk and
greedy CPU decode tokens/s (batch 1, KV cache). Prints a markdown table.

`quantized_rows(teacher, tokenizer, folders, texts, ...)` is the scoring part, meant for
benchmarks/quantized.py (issue 19 item 5: the same on the real-LLM recipe's trained student,
with a quantization-aware run beside post-training quantization).
"""

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from distill.models.loading import load_causal_lm, load_tokenizer
from distill.models.quantize import Scheme
from distill.models.quantized_io import quantize_folder
from distill.models.students import make_student
from distill.pipeline.demo_real import SMOL, heldout_paragraphs, pack, scores_record, text_scores


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


@torch.no_grad()
def decode_tokens_per_s(model, tokenizer, n_tokens: int) -> float:
    """Greedy decode of n_tokens after a short prompt, batch 1, KV cache (one warm-up first)."""
    ids = tokenizer("The standard library", return_tensors="pt").input_ids  # (1, T)
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False)
    return n_tokens / (time.perf_counter() - t0)


def quantized_rows(teacher, tokenizer, folders: dict[str, Path], texts: list[str], max_length: int, decode: int) -> list[dict]:
    """One row per named model folder (full precision or quantized): eval.json-style scores
    against `teacher` on `texts`, the weights' bytes on disk and decode tokens/s."""
    models = {name: load_causal_lm(str(folder)) for name, folder in folders.items()}
    sums = text_scores(teacher, models, tokenizer, texts, max_length, batch=4)
    print(f"scored {len(texts)} rows", file=sys.stderr, flush=True)
    rows = []
    for name, folder in folders.items():
        record = scores_record(sums[name], len(texts), "stdlib docstrings")
        rows.append({"model": name, "forward_kl": record["divergences"]["forward_kl"], "agreement": record["agreement_top1"],
                     "perplexity": record["perplexity"], "bytes": weights_bytes(folder),
                     "decode_tok_s": decode_tokens_per_s(models[name], tokenizer, decode) if decode else None})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=32)
    a = ap.parse_args()
    teacher, tokenizer = load_causal_lm(SMOL), load_tokenizer(SMOL)
    texts = pack(heldout_paragraphs(set()), tokenizer, a.max_length)[: a.rows]
    schemes = {"int8": Scheme("int8"), "int4": Scheme("int4", a.group_size)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher.save_pretrained(tmp / "teacher")
        tokenizer.save_pretrained(tmp / "teacher")
        make_student(SMOL, tmp / "student", layers=a.layers)
        folders, seconds = {}, {}
        for base in ("teacher", "student"):
            folders[f"{base} fp32"] = tmp / base
            for name, scheme in schemes.items():
                record = quantize_folder(tmp / base, tmp / f"{base}-{name}", scheme)
                folders[f"{base} {name}"] = tmp / f"{base}-{name}"
                seconds[f"{base} {name}"] = record["seconds"]
        rows = quantized_rows(teacher, tokenizer, folders, texts, a.max_length, a.decode_tokens)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(f"held out: {len(texts)} rows of stdlib docstrings (<= {a.max_length} tokens); student: {a.layers} of 30 layers; "
          f"int4 group size {a.group_size}")
    print("| model | forward KL to teacher (nats/token) | top-1 agreement | perplexity | weights on disk (MB) | decode tok/s | quantize s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['forward_kl']:.4f} | {r['agreement']:.3f} | {r['perplexity']:.2f} | {r['bytes'] / 1e6:.1f} | "
              f"{r['decode_tok_s']:.1f} | {seconds.get(r['model'], 0.0):.1f} |")


if __name__ == "__main__":
    main()
