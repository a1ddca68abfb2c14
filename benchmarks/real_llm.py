"""Real-LLM students: student init x objective at equal steps and tokens, beside a plain loop.

    python benchmarks/real_llm.py --work /tmp/real_llm --seeds 0 1 2 \\
        --runs depth_width:recipe uniform:kd plain uniform:ce

The teacher is the packaged SmolLM2-135M-Instruct (134.5M parameters); every student has
at most half of that (67.2M). Each run is a real `distill train` of `--steps` optimizer
steps of 4 x 256 tokens of CPython's reference prose (`data.packing`: paragraphs joined into
256-token blocks, attention kept inside each paragraph), except `plain`: the 30-line
PyTorch loop of issue 17 (uniform layer-drop init, full logits, forward KL at T 1, AdamW,
the same warm-up and cosine schedule, the same number of 256-token blocks per step, no
document masks), written out below so it can be read.

Inits (made once in WORK/inits/, the same for every seed):
    random       10 layers at the teacher's width, random weights
    uniform      10 teacher layers spread evenly (`distill student --layers 10`)
    depth        the 10 most important teacher layers (`--prune --layers 10`)
    width        all 30 layers, 6 of 9 heads in 2 of 3 KV groups, hidden 576 -> 384 and MLP
                 1536 -> 1024 by importance, 66.1M (`--prune --heads 6 --kv-heads 2 --params 67M`;
                 llama's config wants the hidden size a multiple of the heads: with 9, only 576)
    depth_width  the 24 most important layers, 6 heads in 3 KV groups, hidden 384, MLP 1344:
                 66.7M (`--prune --layers 24 --heads 6 --kv-heads 3 --hidden-size 384 --params 67M`)
    depthN_mlpM  the N most important layers, each layer's MLP cut to its M most important
                 neurons (`--prune --layers N --intermediate-size M`): 12/1152, 14/1024,
                 16/768, 20/512, all 62.8M to 65.5M parameters
Objectives: ce (labels alone, alpha 0), kd (forward KL, alpha 1, T 1, lr 2e-4: the issue's
settings), recipe (the packaged real-LLM recipe, distill/configs/smollm2_recipe.yaml).

Seeds change the order of the training blocks; data and init are the same for every seed
(paired). Every student is scored on held-out prose of two sources the training text does
not contain and that no test or demo uses: IDLE's help page (Python's idlelib/help.html)
and the licence texts in /usr/share/common-licenses (GPL-3, Apache-2.0, MPL-2.0). Scores:
forward KL(teacher || student) per token at T 1, top-1 agreement with the teacher, the
student's perplexity; and the wall seconds per optimizer step. Results append to
WORK/results.jsonl (a finished run is read back, not rerun); the tables print at the end.
"""

import argparse
import functools
import html.parser
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SMOL = "packaged:smollm2-135m-instruct"
RECIPE = Path(__file__).parent.parent / "distill" / "configs" / "smollm2_recipe.yaml"
INITS = {
    "random": {"layers": 10, "hidden_size": 576},
    "uniform": {"layers": 10},
    "depth": {"prune": True, "layers": 10},
    "width": {"prune": True, "heads": 6, "kv_heads": 2, "params": "67M"},
    "depth_width": {"prune": True, "layers": 24, "heads": 6, "kv_heads": 3, "hidden_size": 384, "params": "67M"},
    "depth12_mlp1152": {"prune": True, "layers": 12, "intermediate_size": 1152},
    "depth14_mlp1024": {"prune": True, "layers": 14, "intermediate_size": 1024},
    "depth16_mlp768": {"prune": True, "layers": 16, "intermediate_size": 768},
    "depth20_mlp512": {"prune": True, "layers": 20, "intermediate_size": 512},
}
OBJECTIVES = ("ce", "kd", "recipe")
LICENCES = ("GPL-3", "Apache-2.0", "MPL-2.0")
HELD_ROWS_PER_SOURCE = 64
CALIBRATION_ROWS = 256  # the first rows of the training text


class _Text(html.parser.HTMLParser):
    """The paragraphs (<p>, <li>, <dd>) of an HTML page as plain text."""

    def __init__(self):
        super().__init__()
        self.paras, self._buf, self._depth = [], [], 0

    def handle_starttag(self, tag, attrs):
        if tag in ("p", "li", "dd"):
            self._flush()
        if tag in ("pre", "script", "style"):
            self._depth += 1

    def handle_endtag(self, tag):
        if tag in ("p", "li", "dd"):
            self._flush()
        if tag in ("pre", "script", "style"):
            self._depth -= 1

    def handle_data(self, data):
        if self._depth == 0:
            self._buf.append(data)

    def _flush(self):
        text = " ".join("".join(self._buf).split())
        self._buf = []
        if len(text) > 120:
            self.paras.append(text)


def heldout_texts() -> dict[str, list[str]]:
    """Held-out prose, by source: IDLE's help page and the licence texts, paragraphs of
    120-1200 characters, the first HELD_ROWS_PER_SOURCE of each (document order)."""
    import idlelib

    parser = _Text()
    parser.feed((Path(idlelib.__file__).parent / "help.html").read_text(encoding="utf-8"))
    licences = []
    for name in LICENCES:
        for para in Path("/usr/share/common-licenses", name).read_text(encoding="utf-8").split("\n\n"):
            para = " ".join(para.split())
            if 120 < len(para) < 1200:
                licences.append(para)
    pick = lambda paras: [p for p in paras if len(p) < 1200][:HELD_ROWS_PER_SOURCE]
    return {"idle_help": pick(parser.paras), "licences": pick(licences)}


def training_rows(work: Path, text: str = "reference") -> Path:
    """{"text"} paragraphs (the real demo's cleaning): CPython's language reference, and with
    `reference+docstrings` the standard library's docstrings after it (the real demo's
    held-out text: more distinct prose, so 200 steps repeat less of it)."""
    from distill.pipeline.demo_real import heldout_paragraphs, train_paragraphs

    path = work / ("train.jsonl" if text == "reference" else "train_docstrings.jsonl")
    if not path.exists():
        paras = train_paragraphs()
        if text != "reference":
            paras += heldout_paragraphs(set(paras))
        path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paras))
    return path


@functools.cache
def teacher_importance(calibration: Path):
    """The teacher's importance scores on the calibration rows: measured once (about 17
    minutes on 2 CPU cores) and kept beside them in importance.safetensors, so every init
    of every later run is cut by the same scores."""
    from dataclasses import asdict, fields

    from safetensors.torch import load_file, save_file

    from distill.models.importance import Importance
    from distill.models.pruning import measure_teacher

    saved = calibration.parent / "importance.safetensors"
    if saved.exists():
        t = load_file(saved)
        kind = {f.name: f.type for f in fields(Importance)}
        return Importance(**{k: (kind[k](v.item()) if kind[k] in (int, float) else v) for k, v in t.items()})
    imp = measure_teacher(SMOL, str(calibration), CALIBRATION_ROWS)
    tensors = {k: (v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.float64)) for k, v in asdict(imp).items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, saved.with_suffix(".tmp"))
    saved.with_suffix(".tmp").rename(saved)
    return imp


def make_init(name: str, work: Path, train: Path) -> Path:
    from distill.models.pruning import make_pruned_student
    from distill.models.students import make_student

    out = work / "inits" / name
    if (out / "student.json").exists():
        return out
    spec = dict(INITS[name])
    if spec.pop("prune", False):
        imp = teacher_importance(train)
        make_pruned_student(
            SMOL, out, calibration=str(train), calibration_rows=CALIBRATION_ROWS, show_progress=False, importance=imp, **spec
        )
    else:
        make_student(SMOL, out, **spec)
    return out


def run_config(student: Path, train: Path, out: Path, seed: int, objective: str, steps: int, recipe: Path = RECIPE):
    """The `distill train` config of one run: the recipe's file for `recipe`, else the issue's."""
    import yaml

    from distill.config import build_config

    if objective == "recipe":
        tree = yaml.safe_load(recipe.read_text())
    else:
        tree = {
            "objective": {"alpha": 0.0 if objective == "ce" else 1.0, "temperature": 1.0, "divergence": "forward_kl"},
            "train": {"lr": 2e-4, "warmup_steps": 20, "fused_optimizer": True},
        }
    tree.setdefault("data", {}).update({"source": str(train), "max_length": 256, "packing": True, "n_test": 8})
    tree.setdefault("train", {}).update({"steps": steps, "micro_batch_size": 4, "grad_accum": 1, "seed": seed})
    tree["eval"] = {"text_generations": 0}
    tree["student"] = {"name": str(student)}
    tree["teacher"] = {"name": SMOL}
    tree["out_dir"] = str(out)
    return build_config(tree)


def train_distill(student: Path, train: Path, out: Path, seed: int, objective: str, steps: int, recipe: Path) -> float:
    """One `distill train` run; returns wall seconds per optimizer step (setup excluded)."""
    from distill.pipeline.runner import run_training

    cfg = run_config(student, train, out, seed, objective, steps, recipe)
    summary = run_training(cfg, evaluate=False, show_progress=False)["train"]
    return summary["segment"]["wall_s"] / steps


def plain_blocks(train: Path, tokenizer, seed: int, steps: int, batch: int, length: int) -> torch.Tensor:
    """The plain loop's data: every paragraph + EOS, concatenated, cut into blocks; the blocks
    shuffled by the seed and repeated as epochs until steps x batch blocks."""
    ids = []
    for line in train.read_text().splitlines():
        ids += tokenizer(json.loads(line)["text"])["input_ids"] + [tokenizer.eos_token_id]
    blocks = torch.tensor(ids[: len(ids) // length * length]).view(-1, length)
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(blocks), generator=g) for _ in range(math.ceil(steps * batch / len(blocks)))])
    return blocks[order[: steps * batch]].view(steps, batch, length)


def plain_step(student, teacher, opt, sched, ids: torch.Tensor, mark=lambda phase: None) -> float:
    """One step of issue 17's plain PyTorch loop on `ids` (B, L): full logits, forward KL at
    T 1, clip 1.0. `mark(phase)` is called as each phase ends (benchmarks/real_step.py times
    them). Returns the loss."""
    with torch.no_grad():
        t_logp = F.log_softmax(teacher(ids).logits[:, :-1].float(), -1)
    mark("teacher")
    s_logits = student(ids).logits
    mark("student")
    s_logp = F.log_softmax(s_logits[:, :-1].float(), -1)
    loss = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    mark("loss")
    loss.backward()
    mark("backward")
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    mark("optimizer")
    return loss.item()


def plain_optimizer(student, steps: int):
    """AdamW 2e-4 (fused), weight decay 0.01, betas (0.9, 0.98); 20 warm-up steps, then cosine to 10%."""
    opt = torch.optim.AdamW(student.parameters(), lr=2e-4, betas=(0.9, 0.98), weight_decay=0.01, fused=True)
    warm = 20

    def lr_at(s: int) -> float:
        return (s + 1) / warm if s < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def train_plain(student_dir: Path, train: Path, out: Path, seed: int, steps: int, teacher, tokenizer) -> float:
    """Issue 17's plain loop (`plain_step`) for `steps` steps of 4 x 256-token blocks;
    returns wall seconds per step."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    data = plain_blocks(train, tokenizer, seed, steps, 4, 256)
    opt, sched = plain_optimizer(student, steps)
    start = time.perf_counter()
    for step in range(steps):
        plain_step(student, teacher, opt, sched, data[step])
    per_step = (time.perf_counter() - start) / steps
    student.save_pretrained(out / "student")
    return per_step


@torch.no_grad()
def scores(student, teacher, tokenizer, texts: list[str]) -> dict:
    """Forward KL(teacher || student) per token at T 1, top-1 agreement and the student's
    perplexity over every next-token target of `texts` (one row each, at most 256 tokens)."""
    kl = agree = nll = n = 0.0
    for i in range(0, len(texts), 8):
        enc = tokenizer(texts[i : i + 8], return_tensors="pt", padding=True, truncation=True, max_length=256)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        keep = mask[:, 1:].bool()
        t = F.log_softmax(teacher(ids, attention_mask=mask).logits[:, :-1].float(), -1)[keep]
        s = F.log_softmax(student(ids, attention_mask=mask).logits[:, :-1].float(), -1)[keep]
        target = ids[:, 1:][keep]
        kl += (t.exp() * (t - s)).sum(-1).sum().item()
        agree += (t.argmax(-1) == s.argmax(-1)).sum().item()
        nll -= s.gather(-1, target[:, None]).sum().item()
        n += len(target)
    return {"kl": kl / n, "top1": agree / n, "ppl": math.exp(nll / n), "tokens": int(n)}


def heldout_scores(student, teacher, tokenizer, held: dict[str, list[str]]) -> dict:
    """Scores per held-out source and pooled over both (token-weighted)."""
    per = {name: scores(student, teacher, tokenizer, texts) for name, texts in held.items()}
    n = sum(s["tokens"] for s in per.values())
    pooled = {k: sum(s[k] * s["tokens"] for s in per.values()) / n for k in ("kl", "top1")}
    pooled["ppl"] = math.exp(sum(math.log(s["ppl"]) * s["tokens"] for s in per.values()) / n)
    return {**pooled, "tokens": n, "by_source": per}


def summarize(results: list[dict], baseline: str) -> None:
    from distill.eval.paired import paired_difference

    by = {}
    for r in results:
        by.setdefault(r["run"], {})[r["seed"]] = r
    print("\n| run | seeds | forward KL | top-1 agreement | perplexity | s/step | KL - " + baseline + " [95% CI] |")
    print("|---|---|---|---|---|---|---|")
    for run, seeds in by.items():
        kls = [s["kl"] for s in seeds.values()]
        top = [100 * s["top1"] for s in seeds.values()]
        ppl = [s["ppl"] for s in seeds.values()]
        sps = [s["s_per_step"] for s in seeds.values()]
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else float("nan")
        diff = ""
        if run != baseline and baseline in by:
            common = [k for k in seeds if k in by[baseline]]
            if len(common) >= 2:
                d = paired_difference([seeds[k]["kl"] for k in common], [by[baseline][k]["kl"] for k in common])
                diff = f"{d.format()} (n={d.n})"
        print(
            f"| {run} | {len(seeds)} | {statistics.fmean(kls):.3f} ± {sd(kls):.3f} | {statistics.fmean(top):.1f} ± {sd(top):.1f}% "
            f"| {statistics.fmean(ppl):.1f} ± {sd(ppl):.1f} | {statistics.fmean(sps):.2f} | {diff} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--runs", nargs="+", default=["depth_width:recipe", "uniform:kd", "plain"],
                    help="INIT:OBJECTIVE pairs, and 'plain' for the plain loop")  # fmt: skip
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--baseline", default="plain", help="the run the paired differences are taken against")
    ap.add_argument("--recipe", type=Path, default=RECIPE, help="the recipe's config file (a variant, to screen it)")
    ap.add_argument("--tag", default="", help="appended to the recipe runs' names, e.g. @lr2e-3, for a variant")
    ap.add_argument("--train-text", choices=["reference", "reference+docstrings"], default="reference",
                    help="the training prose (the inits' calibration rows are the reference's either way)")  # fmt: skip
    ap.add_argument("--score-inits", nargs="*", choices=sorted(INITS), help="also score these inits before training")
    args = ap.parse_args()
    for run in args.runs:
        init, _, objective = run.partition(":")
        if run != "plain" and (init not in INITS or objective not in OBJECTIVES):
            ap.error(f"--runs {run!r}: give INIT:OBJECTIVE with INIT in {sorted(INITS)} and OBJECTIVE in {OBJECTIVES}, or plain")

    from distill.models.loading import count_parameters, load_causal_lm, load_tokenizer

    torch.set_num_threads(torch.get_num_threads())
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    calibration = training_rows(args.work)
    train = training_rows(args.work, args.train_text)
    held = heldout_texts()
    teacher = load_causal_lm(name=SMOL, dtype="float32").eval()
    tokenizer = load_tokenizer(SMOL)
    tokenizer.padding_side = "right"
    results_path = args.work / "results.jsonl"
    done = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.exists() else []
    from transformers import AutoModelForCausalLM

    if args.score_inits:
        print("\n| init | params | forward KL | top-1 agreement | perplexity |\n|---|---|---|---|---|")
        for name in args.score_inits:
            model = AutoModelForCausalLM.from_pretrained(make_init(name, args.work, calibration), dtype=torch.float32).eval()
            s = heldout_scores(model, teacher, tokenizer, held)
            print(f"| {name} | {count_parameters(model) / 1e6:.1f}M | {s['kl']:.3f} | {100 * s['top1']:.1f}% | {s['ppl']:.1f} |")
    args.runs = [r + args.tag if r.endswith(":recipe") else r for r in args.runs]
    for seed in args.seeds:
        for run in args.runs:
            if any(r["run"] == run and r["seed"] == seed and r["steps"] == args.steps for r in done):
                continue
            init, _, objective = run.removesuffix(args.tag).partition(":")
            student_dir = make_init("uniform" if run == "plain" else init, args.work, calibration)
            out = args.work / "runs" / f"{run.replace(':', '-').replace('@', '-')}-s{seed}-{args.steps}"
            if out.exists():
                import shutil

                shutil.rmtree(out)
            if run == "plain":
                out.mkdir(parents=True)
                per_step = train_plain(student_dir, train, out, seed, args.steps, teacher, tokenizer)
            else:
                per_step = train_distill(student_dir, train, out, seed, objective, args.steps, args.recipe)
            model = AutoModelForCausalLM.from_pretrained(out / "student", dtype=torch.float32).eval()
            row = {"run": run, "seed": seed, "steps": args.steps, "params": count_parameters(model), "s_per_step": per_step,
                   "train_text": args.train_text, "recipe": str(args.recipe) if objective == "recipe" else None,
                   **heldout_scores(model, teacher, tokenizer, held)}  # fmt: skip
            print(
                json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "by_source"}),
                flush=True,
            )
            with results_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            done.append(row)
    summarize([r for r in done if r["steps"] == args.steps and r["run"] in args.runs and r["seed"] in args.seeds], args.baseline)


if __name__ == "__main__":
    main()
