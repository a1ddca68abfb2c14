"""`distill demo --real`: logit KD against labels alone on a real LLM, offline, on CPU.

The teacher is the packaged SmolLM2-135M-Instruct (no model hub); the student is its
layer-drop student (`distill student --layers 10`: 10 of its 30 decoder layers, copied).
Two students start from that same init and train on the same rows in the same order for
the same steps: one with logit KD (forward KL, alpha 1, T 1), one on the labels alone
(alpha 0). Training text: CPython's language reference (`pydoc_data.topics`). Held-out
text, from another source: docstrings of standard-library modules. Every model is scored
on the held-out text: forward KL(teacher || model) per token at T = 1 (the headline),
top-1 agreement with the teacher, and perplexity.

    DEMO/
      data/train.jsonl     {"text"} rows of reference prose: paragraphs joined up to max_length tokens
      data/heldout.jsonl   {"text"} rows of stdlib docstrings
      student-init/        the layer-drop student both runs start from
      student-kd/          run directory (eval.json: the held-out scores below)
      student-labels/      run directory
      report.html, demo.json
"""

import importlib
import inspect
import json
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from distill import rundir
from distill.config import build_config
from distill.data.rows import Row, collate, tokenize_rows
from distill.errors import DistillError
from distill.eval.metrics import perplexity
from distill.loss.token_losses import IGNORE_INDEX
from distill.models.loading import check_vocabularies, count_parameters, load_causal_lm, load_tokenizer
from distill.models.students import make_student
from distill.paths import atomic_write_json
from distill.pipeline.demo import fresh_run_dir
from distill.pipeline.runner import run_training
from distill.report import write_report

SMOL = "packaged:smollm2-135m-instruct"
# Held-out text: docstrings of these standard-library modules (and of their public classes
# and functions). Pure-Python modules present in every CPython 3.10+; English prose that
# neither the training text (the language reference) nor any test uses.
HELDOUT_MODULES = (
    "argparse", "calendar", "collections", "concurrent.futures", "configparser", "contextlib",
    "csv", "dataclasses", "difflib", "email.message", "enum", "fractions", "ftplib", "functools",
    "gettext", "gzip", "heapq", "http.client", "imaplib", "ipaddress", "logging", "mailbox",
    "optparse", "pathlib", "pickle", "pprint", "queue", "random", "sched", "shlex", "shutil",
    "smtplib", "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "tokenize", "typing", "urllib.parse", "urllib.request", "uuid",
    "warnings", "zipfile",
)  # fmt: skip


@dataclass(frozen=True)
class RealDemo:
    """What the real demo trains and scores; the defaults are the measured `distill demo --real`."""

    teacher: str = SMOL
    layers: int = 10  # decoder layers the layer-drop student keeps, spread evenly
    steps: int = 100  # optimizer steps per student
    batch: int = 4  # rows per step
    max_length: int = 128  # tokens per row (EOS included): rows are packed paragraphs
    lr: float = 3e-4
    warmup_steps: int = 5
    heldout_rows: int = 32
    eval_batch: int = 8


def clean_paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a text: whitespace collapsed; code, tables and lists left out."""
    out = []
    for para in text.split("\n\n"):
        para = " ".join(para.split())
        prose = sum(c.isalpha() or c == " " for c in para) >= 0.8 * len(para) if para else False
        if 80 < len(para) < 600 and prose and not para.startswith(("*", "|", ">>>", "-", "+", "=")):
            out.append(para)
    return out


def train_paragraphs() -> list[str]:
    """CPython's language reference (`pydoc_data.topics`), in topic order."""
    from pydoc_data.topics import topics

    return [p for name in sorted(topics) for p in clean_paragraphs(topics[name])]


def heldout_paragraphs(exclude: set[str]) -> list[str]:
    """Docstrings of HELDOUT_MODULES (module, then public classes and functions defined there),
    without any paragraph that is also in `exclude` (the training text)."""
    seen, out = set(exclude), []
    for name in HELDOUT_MODULES:
        module = importlib.import_module(name)
        docs = [module.__doc__]
        with warnings.catch_warnings():  # typing.io and typing.re warn when read
            warnings.simplefilter("ignore", DeprecationWarning)
            for attr, obj in sorted(vars(module).items()):
                public = not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
                if public and getattr(obj, "__module__", None) == name:  # defined here, not imported
                    docs.append(obj.__doc__)  # its own, not an inherited docstring
        for doc in docs:
            for para in clean_paragraphs(inspect.cleandoc(doc)) if isinstance(doc, str) else []:
                if para not in seen:
                    seen.add(para)
                    out.append(para)
    return out


def pack(paragraphs: list[str], tokenizer, max_tokens: int) -> list[str]:
    """Consecutive paragraphs joined into rows of at most `max_tokens` tokens each (counted by
    the tokenizer on the joined text); a paragraph too long alone is cut between words, and a
    single word longer than a row is left out."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    rows, current = [], ""
    for para in paragraphs:
        joined = f"{current}\n\n{para}" if current else para
        if count(joined) <= max_tokens:
            current = joined
            continue
        if current:
            rows.append(current)
        words = para.split(" ")
        while count(" ".join(words)) > max_tokens:  # the longest head of words that fits
            if count(words[0]) > max_tokens:  # one "word" longer than a row: not prose
                words = words[1:]
                continue
            lo, hi = 1, len(words) - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if count(" ".join(words[:mid])) <= max_tokens else (lo, mid - 1)
            rows.append(" ".join(words[:lo]))
            words = words[lo:]
        current = " ".join(words)
    return rows + ([current] if current else [])


def spread(items: list, n: int) -> list:
    """n items evenly spaced over the list (all of them when it has n or fewer)."""
    if len(items) <= n:
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def write_rows(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def write_data(out: Path, tokenizer, s: RealDemo) -> tuple[Path, Path]:
    """data/train.jsonl (all reference prose) and data/heldout.jsonl (s.heldout_rows of docstrings)."""
    train = train_paragraphs()
    room = s.max_length - 1  # tokenize_rows appends EOS
    train_path = write_rows(out / "data" / "train.jsonl", pack(train, tokenizer, room))
    held = spread(pack(heldout_paragraphs(set(train)), tokenizer, room), s.heldout_rows)
    return train_path, write_rows(out / "data" / "heldout.jsonl", held)


def init_student(out: Path, s: RealDemo) -> Path:
    """The layer-drop student both runs start from, made afresh (the demo owns the folder)."""
    folder = out / "student-init"
    if folder.exists():
        if not (folder / "student.json").exists():
            raise DistillError(f"{folder} exists and is not a student folder; choose another --out")
        shutil.rmtree(folder)
    make_student(s.teacher, folder, layers=s.layers)
    return folder


def student_tree(s: RealDemo, student: Path, data: tuple[Path, Path], run: Path, kd: bool, seed: int) -> dict:
    """One student's run config: logit KD (forward KL, alpha 1, T 1) or labels alone (alpha 0)."""
    return {
        "student": {"name": str(student)},
        "teacher": {"name": s.teacher} if kd else None,
        "data": {"source": str(data[0]), "eval_source": str(data[1]), "max_length": s.max_length,
                 "n_test": s.heldout_rows},
        "objective": {"alpha": 1.0 if kd else 0.0, "temperature": 1.0, "divergence": "forward_kl"},
        "features": {"probe_examples": 0},
        "train": {"steps": s.steps, "micro_batch_size": s.batch, "lr": s.lr, "warmup_steps": s.warmup_steps,
                  "fused_optimizer": True, "seed": seed},
        "eval": {"batch_size": s.eval_batch},
        "out_dir": str(run),
    }  # fmt: skip


def text_sums(logits: torch.Tensor, labels: torch.Tensor, t_logp: torch.Tensor) -> dict[str, float]:
    """Sums over the next-token targets of one teacher-forced batch: count, ce (the model's
    cross-entropy), t_ce (the teacher's), kl (forward KL(teacher || model) at T = 1) and
    agreement (targets where both models' top-1 token is the same).

    Args:
        logits: (B, T, V) the model's, sliced to the shared vocabulary.
        labels: (B, T) token ids, IGNORE_INDEX where no loss falls.
        t_logp: (n, V) the teacher's log-probabilities at the n scored positions.

    Kept here, self-contained, until distill/eval has held-out text metrics of its own (it
    computes what `eval.metrics.forced_sums` does for forward KL alone: that one computes
    four divergences per model, 5x the time on a 49k vocabulary on CPU).
    """
    mask = labels[:, 1:] != IGNORE_INDEX  # (B, T-1) position t predicts token t + 1
    targets = labels[:, 1:][mask]  # (n,)
    logp = torch.log_softmax(logits[:, :-1][mask].float(), -1)  # (n, V)
    kl = (t_logp.exp() * (t_logp - logp)).sum(-1)  # (n,)
    return {
        "count": float(mask.sum()),
        "ce": -logp.gather(1, targets[:, None]).sum().item(),
        "t_ce": -t_logp.gather(1, targets[:, None]).sum().item(),
        "kl": kl.sum().item(),
        "agreement": float((logp.argmax(-1) == t_logp.argmax(-1)).sum()),
    }


@torch.no_grad()
def text_scores(teacher, models: dict, tokenizer, texts: list[str], max_length: int, batch: int) -> dict:
    """Teacher-forced `text_sums` of each model on held-out text, summed over the batches (one
    teacher forward per batch, shared by all models), and each model's forward seconds."""
    vocab = check_vocabularies(tokenizer, tokenizer, teacher.config.vocab_size, teacher.config.vocab_size)
    examples = tokenize_rows([Row("", t) for t in texts], tokenizer, max_length, source="held-out text")
    sums = {name: {"seconds": 0.0} for name in models}
    for i in range(0, len(examples), batch):
        b = collate(examples[i : i + batch], tokenizer.pad_token_id)
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        mask = b["labels"][:, 1:] != IGNORE_INDEX  # (B, T-1)
        t_logits = teacher(**inputs).logits[:, :-1, :vocab][mask]  # (n, V)
        t_logp = torch.log_softmax(t_logits.float(), -1)  # (n, V)
        for name, model in models.items():
            t0 = time.perf_counter()
            logits = model.eval()(**inputs).logits[..., :vocab]  # (B, T, V)
            for k, v in text_sums(logits, b["labels"], t_logp).items():
                sums[name][k] = sums[name].get(k, 0.0) + v
            sums[name]["seconds"] += time.perf_counter() - t0
    return sums


def scores_record(sums: dict, n: int, source: str) -> dict:
    """Per-token means of `text_scores` as an eval.json tree (keys the report reads)."""
    count = max(sums["count"], 1.0)
    ce, t_ce = sums["ce"] / count, sums["t_ce"] / count
    return {
        "n": n, "tokens": int(sums["count"]), "source": source,
        "heldout_ce": ce, "perplexity": perplexity(ce),
        "agreement_top1": sums["agreement"] / count,
        "divergences": {"forward_kl": sums["kl"] / count},
        "teacher": {"heldout_ce": t_ce, "perplexity": perplexity(t_ce)},
        "wall_s": sums["seconds"],
    }  # fmt: skip


def gain_line(kd: dict, labels: dict, seed: int) -> str:
    """The comparison in one sentence, with what it means."""
    diff = labels["kl"] - kd["kl"]
    verdict = "better" if diff > 0 else "worse" if diff < 0 else "no different"
    return (
        f"gain: logit KD left the student {abs(diff):.3f} nats/token {'closer to' if diff > 0 else 'further from'} "
        f"the teacher on unseen text than labels alone (held-out KL {kd['kl']:.3f} vs {labels['kl']:.3f}: {verdict}; "
        f"perplexity {kd['perplexity']:.1f} vs {labels['perplexity']:.1f}; same init, data, steps and tokens, seed {seed})"
    )


def demo_table(title: str, rows: dict) -> Table:
    table = Table(title=title)
    cols = ("model", "KL to teacher", "top-1 agree", "perplexity", "params", "train tok/s", "train s")
    for col in cols:
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
    dash = "-"
    for name, r in rows.items():
        trained = r.get("tokens_per_s") is not None
        table.add_row(
            name,
            dash if r["kl"] is None else f"{r['kl']:.3f}",
            dash if r["agreement"] is None else f"{r['agreement']:.1%}",
            f"{r['perplexity']:.1f}",
            f"{r['params']:,}",
            f"{r['tokens_per_s']:,.0f}" if trained else dash,
            f"{r['wall_s']:.0f}" if trained else dash,
        )
    return table


def run_real_demo(out: Path, seed: int = 0, settings: RealDemo | None = None) -> dict:
    """Teacher, layer-drop student, a KD run and a label-only run, held-out scores, table,
    gain line, report.html and demo.json in `out`; returns demo.json's tree."""
    s, console, t_start = settings or RealDemo(), Console(stderr=True), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("student-kd", "student-labels"):
        fresh_run_dir(out / name)  # refuse a foreign folder before minutes of work
    console.print(f"[bold]teacher[/] {s.teacher}; [bold]student[/]: its {s.layers}-layer layer-drop student")
    student_dir = init_student(out, s)
    tokenizer = load_tokenizer(str(student_dir))
    data = write_data(out, tokenizer, s)
    runs = {}
    for name, kd in (("student-kd", True), ("student-labels", False)):
        console.print(f"[bold]{name}[/]: {'logit KD (forward KL, alpha 1, T 1)' if kd else 'labels only (alpha 0)'}")
        tree = student_tree(s, student_dir, data, out / name, kd, seed)
        runs[name] = run_training(build_config(tree, source="distill demo --real"), evaluate=False)

    console.print("[bold]held-out scores[/] on stdlib docstrings")
    held = [json.loads(line)["text"] for line in data[1].read_text().splitlines()]
    teacher = load_causal_lm(s.teacher)
    models = {"student-init": load_causal_lm(str(student_dir))}
    models |= {name: load_causal_lm(str(out / name / rundir.STUDENT)) for name in runs}
    sums = text_scores(teacher, models, tokenizer, held, s.max_length, s.eval_batch)
    source = f"docstrings of {len(HELDOUT_MODULES)} standard-library modules"
    scores = {name: scores_record(sums[name], len(held), source) for name in models}
    for name in runs:
        atomic_write_json(out / name / rundir.EVAL, scores[name])

    def row(name: str, params: int, train: dict | None) -> dict:
        ev = scores[name]
        return {
            "kl": ev["divergences"]["forward_kl"], "agreement": ev["agreement_top1"], "perplexity": ev["perplexity"],
            "heldout_ce": ev["heldout_ce"], "params": params, "run_dir": str(out / name),
            "tokens_per_s": train and train["tokens_per_s"], "wall_s": train and train["wall_s"],
            "train_tokens": train and train["tokens"],
        }  # fmt: skip

    teacher_ev = scores["student-kd"]["teacher"]
    rows = {
        "teacher": {"kl": None, "agreement": None, "perplexity": teacher_ev["perplexity"],
                    "heldout_ce": teacher_ev["heldout_ce"], "params": count_parameters(teacher), "run_dir": None},
        "student at init (layer drop)": row("student-init", count_parameters(models["student-init"]), None),
        "student, logit KD": row("student-kd", runs["student-kd"]["train"]["params"], runs["student-kd"]["train"]),
        "student, labels only": row("student-labels", runs["student-labels"]["train"]["params"],
                                    runs["student-labels"]["train"]),
    }  # fmt: skip
    gain = gain_line(rows["student, logit KD"], rows["student, labels only"], seed)
    n_tokens = scores["student-kd"]["tokens"]
    setup = (
        f"teacher {s.teacher}; student: its {s.layers}-layer layer-drop student; {s.steps} steps x {s.batch} rows of "
        f"<= {s.max_length} tokens of CPython reference prose ({runs['student-kd']['train']['tokens']:,} tokens per "
        f"student, lr {s.lr:g}); held out: {len(held)} rows ({n_tokens:,} tokens) of stdlib docstrings"
    )
    out_console = Console()
    if not out_console.is_terminal:  # a pipe or log file: do not squeeze the table to 80 columns
        out_console = Console(width=140)
    out_console.print(demo_table(f"distill demo --real, seed {seed}", rows))
    out_console.print(setup, soft_wrap=True)
    out_console.print("KL to teacher: held-out forward KL(teacher || model) per token at T = 1 (nats; lower is better)",
                      soft_wrap=True)  # fmt: skip
    out_console.print(gain, soft_wrap=True)
    for name in ("student-init", *runs):
        out_console.print(f"{name:>16}: {out / name}", soft_wrap=True)
    report = write_report([out / n for n in runs], out / "report.html", names=list(runs))
    out_console.print(f"{'report':>16}: {report}", soft_wrap=True)
    summary = {
        "task": "real", "metric": "held-out forward KL to the teacher", "seed": seed, "settings": asdict(s),
        "setup": setup, "heldout_source": source, "heldout_rows": len(held), "heldout_tokens": n_tokens,
        "train_rows": len(data[0].read_text().splitlines()), "runs": rows, "gain": gain, "report": str(report),
        "wall_s": time.perf_counter() - t_start,
    }  # fmt: skip
    atomic_write_json(out / "demo.json", summary)
    return summary
