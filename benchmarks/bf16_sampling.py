"""On-policy rollouts from a bf16 copy of the student (on_policy.sample_dtype: bfloat16):
speed, and how far its samples are from the fp32 student's.

    python benchmarks/bf16_sampling.py [--work runs/bench-on-policy] [--batches 4]

The student of benchmarks/on_policy.py (SmolLM2-135M-Instruct's 10-layer layer-drop
student, 64M parameters) samples 64 new tokens (EOS masked, temperature 1) for batches of 4
prose prompts, with the same per-row seeds from its fp32 weights and from the bf16 copy
(`distill.training.on_policy.Sampler`, its refresh timed with the rollout). Speed: median
seconds per rollout over the batches after one warm-up. Effect, over all rows: the tokens
the two draw alike before their first difference, the fp32 student's mean log-prob of each
mode's samples, and the mean per-token KL(fp32 || bf16) of the next-token distributions
along the bf16 samples. Run it alone on the machine.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import on_policy  # the student folder and the prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/bench-on-policy"))
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()

    from distill.models.loading import load_causal_lm, load_tokenizer
    from distill.training.on_policy import Sampler
    from distill.training.rollout import Sampling, rollout

    args.work.mkdir(parents=True, exist_ok=True)
    paths = on_policy.prepare(args.work, 4 * (args.batches + 1), 48)
    tok = load_tokenizer(paths["student"])
    student = load_causal_lm(paths["student"], dtype="float32").eval()
    rows = [json.loads(line) for line in Path(paths["prompts"]).read_text().splitlines()]
    prompts = [tok(r["prompt"], add_special_tokens=False).input_ids for r in rows][: 4 * (args.batches + 1)]
    sampling = Sampling(args.new_tokens, 1.0, 0, 1.0, args.new_tokens)
    samplers = {"float32": Sampler("float32"), "bfloat16": Sampler("bfloat16")}
    times = {name: [] for name in samplers}
    samples = {name: [] for name in samplers}
    for b in range(args.batches + 1):  # batch 0: warm-up, untimed
        batch = prompts[4 * b : 4 * b + 4]
        seeds = [1000 + 4 * b + i for i in range(len(batch))]
        for name, sampler in samplers.items():
            t0 = time.perf_counter()
            model = sampler(student)  # the bf16 copy is refreshed here, as in training
            out = rollout(model, batch, sampling, tok.eos_token_id, tok.pad_token_id or tok.eos_token_id, seeds)
            if b:
                times[name].append(time.perf_counter() - t0)
                samples[name] += [(p, c) for p, c in zip(batch, out.completions)]

    def logprobs(model, prompt, completion):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)  # (N, V)
        return logits

    bf16 = samplers["bfloat16"](student)
    same, mean_lp, kls = [], {name: [] for name in samplers}, []
    for (p, a), (_, b) in zip(samples["float32"], samples["bfloat16"]):
        same.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)))
    for name in samplers:
        for p, c in samples[name]:
            lp = logprobs(student, p, c)
            mean_lp[name].append(lp.gather(-1, torch.tensor(c)[:, None]).mean().item())
    for p, c in samples["bfloat16"]:
        lp, lq = logprobs(student, p, c), logprobs(bf16, p, c)
        kls.append((lp.exp() * (lp - lq)).sum(-1).mean().item())
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{len(samples['float32'])} rows, batches of 4, {args.new_tokens} new tokens\n")  # fmt: skip
    print("| sampling from | s/rollout | vs fp32 | fp32 student's mean log-prob of the samples |\n|---|---|---|---|")
    base = statistics.median(times["float32"])
    for name in samplers:
        s = statistics.median(times[name])
        print(f"| {name} | {s:.2f} | {base / s:.2f}x | {statistics.fmean(mean_lp[name]):.3f} |")
    print(f"\ntokens drawn alike before the first difference: mean {statistics.fmean(same):.1f} of {args.new_tokens} "
          f"(min {min(same)}, max {max(same)}); KL(fp32 || bf16) along the bf16 samples: {statistics.fmean(kls):.2e} nats/token")


if __name__ == "__main__":
    main()
