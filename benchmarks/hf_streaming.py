"""Reading the training rows of an hf: source: `data.streaming` (the first n_train rows) against a
full load, on a local parquet file of synthetic prompt / completion rows, and the same rows as a
JSONL file read by distill itself. Prints a table.

    python benchmarks/hf_streaming.py [--rows 500000] [--n-train 1000]

The first read in a process pays for `datasets`' own setup; it is shown apart ("first call").
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import datasets

from distill.config import build_config
from distill.data.build import build_rows


def read(source: str, n_train: int, streaming: bool) -> tuple[int, float]:
    tree = {"student": {"config": {"model_type": "llama"}, "tokenizer": "builtin"}, "objective": {"alpha": 0.0}}
    dcfg = build_config(tree | {"data": {"source": source, "n_train": n_train, "streaming": streaming}}).data
    t = time.perf_counter()
    rows = build_rows(dcfg, "train")
    return len(rows), time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--n-train", type=int, default=1000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="distill-hf-bench-"))
    try:
        datasets.config.HF_DATASETS_CACHE = work / "cache"  # a cold cache: the full load converts the file
        n = args.rows
        data = {"prompt": [f"Q: what is {i} + {i % 97}?" for i in range(n)], "completion": [f"{i + i % 97}" for i in range(n)]}
        datasets.Dataset.from_dict(data).to_parquet(str(work / "rows.parquet"))
        datasets.Dataset.from_dict(data).to_json(str(work / "rows.jsonl"))  # the same rows for distill's reader
        source = str(work / "rows.parquet")
        print(f"{n:,} rows, {(work / 'rows.parquet').stat().st_size / 2**20:.1f} MiB parquet; n_train={args.n_train}")
        print(f"{'read':<28} {'rows':>9} {'seconds':>8}")
        for label, streaming in (("streaming (first call)", True), ("streaming", True), ("full load (cold cache)", False)):
            got, seconds = read(source, args.n_train, streaming)
            print(f"{label:<28} {got:>9,} {seconds:>8.2f}")
        got, seconds = read(str(work / "rows.jsonl"), args.n_train, False)
        print(f"{'the same rows as JSONL':<28} {got:>9,} {seconds:>8.2f}")
        cache = sum(p.stat().st_size for p in (work / "cache").rglob("*") if p.is_file())
        print(f"datasets' Arrow cache after the full load: {cache / 2**20:.1f} MiB (streaming writes none)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
