"""Load time of the packaged SmolLM2-135M-Instruct: first (dequantising) load vs cached.

    python benchmarks/load_smollm2.py

Uses a fresh temporary cache folder so the first load really dequantises; prints a table.
"""

import os
import platform
import tempfile
import time

import torch


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        os.environ["DISTILL_CACHE"] = cache
        from distill.models.loading import load_causal_lm, load_tokenizer

        rows = []
        t0 = time.perf_counter()
        model = load_causal_lm("packaged:smollm2-135m-instruct")
        rows.append(("first load (dequantise GGUF, write safetensors cache)", time.perf_counter() - t0))
        t0 = time.perf_counter()
        model = load_causal_lm("packaged:smollm2-135m-instruct")
        rows.append(("second load (safetensors cache)", time.perf_counter() - t0))
        t0 = time.perf_counter()
        tok = load_tokenizer("packaged:smollm2-135m-instruct")
        rows.append(("tokenizer (cache)", time.perf_counter() - t0))
        ids = torch.randint(0, len(tok), (4, 256))
        with torch.no_grad():
            model(input_ids=ids)  # warm-up
            t0 = time.perf_counter()
            model(input_ids=ids)
        rows.append(("forward 4 x 256 tokens, no grad", time.perf_counter() - t0))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(f"| {'step':<55} | seconds |")
    print(f"|{'-' * 57}|---------|")
    for name, sec in rows:
        print(f"| {name:<55} | {sec:7.2f} |")


if __name__ == "__main__":
    main()
