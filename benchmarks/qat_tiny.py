"""Quantization-aware vs post-training int4 on tiny random models, paired over seeds.

    python benchmarks/qat_tiny.py OUT_DIR [--seeds 0 1 2] [--steps 60]

The built-in chain task, a random 3-layer llama teacher, a 2-layer student, pure KD; per seed
one run with quant.aware=false (int4 at the export) and one with quant.aware=true, the same
steps. Prints each run's held-out forward KL to the teacher (eval-int4.json and eval.json)
and the paired difference PTQ - QAT with its spread. A check of the mechanism, not of the
issue's acceptance, which needs a trained real student (benchmarks/quantized.py, to come).
"""

import argparse
import copy
import statistics
from pathlib import Path

from distill.config import build_config
from distill.pipeline.runner import run_training

STUDENT = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128, "tie_word_embeddings": True}
TEACHER = {**STUDENT, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3}


def tree(seed: int, steps: int, aware: bool, out: Path) -> dict:
    return {
        "student": {"config": STUDENT, "tokenizer": "builtin"},
        "teacher": {"config": TEACHER, "tokenizer": "builtin"},
        "data": {"n_train": 512, "n_test": 32},
        "objective": {"alpha": 1.0, "temperature": 1.0},
        "train": {"steps": steps, "micro_batch_size": 16, "lr": 1e-2, "warmup_steps": 5, "seed": seed},
        "eval": {"max_new_tokens": 4, "batch_size": 16},
        "quant": {"scheme": "int4", "group_size": 16, "aware": aware},
        "out_dir": str(out),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=60)
    a = ap.parse_args()
    print("| seed | PTQ int4 KL | QAT int4 KL | PTQ - QAT | fp32 KL (PTQ run) | fp32 KL (QAT run) |")
    print("|---|---|---|---|---|---|")
    diffs = []
    for seed in a.seeds:
        kl = {}
        for name, aware in (("ptq", False), ("qat", True)):
            result = run_training(build_config(copy.deepcopy(tree(seed, a.steps, aware, a.out / f"{name}-{seed}"))), show_progress=False)
            kl[name] = result["eval_quantized"]["divergences"]["forward_kl"]
            kl[f"{name}_fp"] = result["eval"]["divergences"]["forward_kl"]
        diffs.append(kl["ptq"] - kl["qat"])
        print(f"| {seed} | {kl['ptq']:.4g} | {kl['qat']:.4g} | {diffs[-1]:.3g} | {kl['ptq_fp']:.4g} | {kl['qat_fp']:.4g} |", flush=True)
    spread = f", sd {statistics.stdev(diffs):.3g}" if len(diffs) > 1 else ""
    print(f"paired PTQ - QAT: mean {statistics.mean(diffs):.3g} nats/token{spread} over {len(diffs)} seeds")


if __name__ == "__main__":
    main()
