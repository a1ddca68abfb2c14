"""`distill curate`: keep the teacher's good rationales, and say why the others went.

Each generation row is split into (rationale, answer) by an answer format
(`distill.eval.answers`) and checked, first failing check wins:

    teacher_error     the server refused this prompt (an error row of `distill generate`)
    truncated         the teacher hit max_new_tokens (finish_reason "length")
    no_answer         no answer in the format
    too_short/long    rationale length outside [min_chars, max_chars]
    inconsistent      the rationale concludes another number than the stated answer (its
                      last number and its last equation's result both differ)
    wrong_answer      the answer differs from the gold answer (where there is one)
    low_agreement     under min_agreement of the prompt's samples share the majority answer
    not_majority      without a gold answer: not the prompt's majority vote (n > 1)
    duplicate         the same prompt, rationale and answer as a kept row (after normalising)
    near_duplicate    MinHash Jaccard of prompt + rationale >= near_dup with a kept row
    surplus_sample    the prompt already has per_prompt kept rows

Kept rows (curated.jsonl) are training rows: prompt, completion (the teacher's text,
rationale then answer), rationale, answer, plus gold, majority_answer, agreement and
n_samples columns; the rows of chat prompts keep their "messages" (and train as chat rows).
Rejected rows go to rejected.jsonl with their reason; curation.json counts both.
"""

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from datasketch import MinHash, MinHashLSH

from distill.errors import ConfigError, DistillError
from distill.eval.answers import consistent, normalize, splitter
from distill.paths import atomic_write_json, atomic_write_text, jsonl_objects

REASONS = (
    "teacher_error", "truncated", "no_answer", "too_short", "too_long", "inconsistent", "wrong_answer",
    "low_agreement", "not_majority", "duplicate", "near_duplicate", "surplus_sample",
)


@dataclass(frozen=True)
class CurateSettings:
    answer_format: str = "auto"
    min_chars: int = 1
    """Shortest rationale kept (characters)."""
    max_chars: int | None = None
    """Longest rationale kept; None: no limit."""
    keep_truncated: bool = False
    check_consistency: bool = True
    check_gold: bool = True
    self_consistency: bool = True
    """With several samples per prompt, keep only answers equal to the majority vote."""
    min_agreement: float = 0.0
    """Drop prompts whose majority answer has under this share of the samples."""
    near_dup: float | None = 0.9
    """MinHash Jaccard threshold of near-duplicates; None: off."""
    shingle: int = 5
    """Character n-gram size of the near-duplicate shingles."""
    per_prompt: int = 1
    """Most rows kept per prompt."""


def read_generations(path: Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "generations.jsonl"
    rows = []
    for where, row in jsonl_objects(path, "generations"):
        missing = [k for k in ("prompt", "completion") if not isinstance(row.get(k), str)]
        if missing:
            raise DistillError(f"{where}: a generation row needs string {', '.join(map(repr, missing))}")
        gold = row.get("answer")
        if isinstance(gold, (int, float)) and not isinstance(gold, bool):
            row["answer"] = str(gold)  # a numeric gold answer is graded as its text: 42 -> "42"
        elif gold is not None and not isinstance(gold, str):
            raise DistillError(f"{where}: 'answer' (the gold answer) must be a string or a number, got {type(gold).__name__}")
        for key in ("prompt_hash", "finish_reason", "key", "teacher"):
            if row.get(key) is not None and not isinstance(row[key], str):
                raise DistillError(f"{where}: {key!r} must be a string, got {type(row[key]).__name__}")
        row.setdefault("prompt_hash", row["prompt"])
        rows.append(row)
    if not rows:
        raise DistillError(f"{path}: no generation rows")
    return rows


def vote(answers: list[str | None]) -> tuple[str | None, float]:
    """(majority answer, its share of all samples); ties go to the answer seen first."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None, 0.0
    best = max(counts.values())
    winner = next(a for a in answers if a is not None and counts[a] == best)
    return winner, best / len(answers)


def check(row: dict, s: CurateSettings) -> str | None:
    """The first failing per-row check, or None."""
    if row.get("finish_reason") == "error":
        return "teacher_error"
    if row.get("finish_reason") == "length" and not s.keep_truncated:
        return "truncated"
    if row["answer"] is None:
        return "no_answer"
    if len(row["rationale"]) < s.min_chars:
        return "too_short"
    if s.max_chars is not None and len(row["rationale"]) > s.max_chars:
        return "too_long"
    if s.check_consistency and consistent(row["rationale"], row["answer"]) is False:
        return "inconsistent"
    graded = s.check_gold and row.get("gold") is not None
    if graded and normalize(row["gold"]) != row["_norm"]:
        return "wrong_answer"
    if row["agreement"] < s.min_agreement:
        return "low_agreement"
    # Self-consistency stands in for a gold answer: a row that matches its gold answer stays.
    if s.self_consistency and not graded and row["n_samples"] > 1 and row["_norm"] != row["majority_answer"]:
        return "not_majority"
    return None


def shingles(text: str, k: int) -> set[bytes]:
    text = " ".join(text.lower().split())
    return {text[i : i + k].encode() for i in range(max(len(text) - k + 1, 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def curate(generations: list[dict], s: CurateSettings) -> tuple[list[dict], list[dict], dict]:
    """(kept rows, rejected rows with 'reason', summary)."""
    if s.near_dup is not None and not 0 < s.near_dup <= 1:
        raise ConfigError(f"--near-dup must be in (0, 1], got {s.near_dup}")
    if s.per_prompt < 1 or s.shingle < 1:
        raise ConfigError("--per-prompt and --shingle must be at least 1")
    split = splitter(s.answer_format)
    rows = []
    for g in generations:
        found = split(g["completion"])
        rationale, answer = found if found is not None else (g["completion"].strip(), None)
        rows.append({
            "prompt": g["prompt"], "completion": g["completion"].strip(), "rationale": rationale, "answer": answer,
            "gold": g.get("answer"), "prompt_hash": g["prompt_hash"], "key": g.get("key"), "teacher": g.get("teacher"),
            "finish_reason": g.get("finish_reason"), "_norm": None if answer is None else normalize(answer),
            **({"messages": g["messages"]} if "messages" in g else {}),  # a chat prompt's: its rows train as chat rows
        })
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["prompt_hash"], []).append(r)
    for group in groups.values():
        majority, agreement = vote([r["_norm"] for r in group])
        for r in group:
            r.update(majority_answer=majority, agreement=agreement, n_samples=len(group))

    kept, rejected = [], []
    seen_exact: set[tuple[str, str, str]] = set()
    per_prompt: Counter = Counter()
    # LSH finds candidates at a lower threshold (it misses some pairs near its own); the
    # exact Jaccard of the shingle sets decides.
    lsh = MinHashLSH(threshold=max(0.05, s.near_dup - 0.2), num_perm=128) if s.near_dup is not None else None
    kept_shingles: dict[int, set[bytes]] = {}  # by row number
    for i, r in enumerate(rows):
        reason = check(r, s)
        if reason is None:
            exact = (" ".join(r["prompt"].split()), " ".join(r["rationale"].split()), r["_norm"])
            if exact in seen_exact:
                reason = "duplicate"
        if reason is None and lsh is not None:
            sh = shingles(r["prompt"] + "\n" + r["rationale"], s.shingle)
            mh = MinHash(num_perm=128)
            mh.update_batch(sorted(sh))
            if any(jaccard(kept_shingles[k], sh) >= s.near_dup for k in lsh.query(mh)):
                reason = "near_duplicate"
        if reason is None and per_prompt[r["prompt_hash"]] >= s.per_prompt:
            reason = "surplus_sample"
        out = {k: v for k, v in r.items() if not k.startswith("_")}
        if reason is not None:
            rejected.append({**out, "reason": reason})
            continue
        kept.append(out)
        seen_exact.add(exact)
        per_prompt[r["prompt_hash"]] += 1
        if lsh is not None:
            lsh.insert(i, mh)
            kept_shingles[i] = sh
    return kept, rejected, summarize(rows, groups, kept, rejected, s)


def summarize(rows, groups, kept, rejected, s: CurateSettings) -> dict:
    graded = [r for r in rows if r["gold"] is not None]
    majority_graded = [g[0] for g in groups.values() if g[0]["gold"] is not None]
    by_reason = Counter(r["reason"] for r in rejected)
    return {
        "rows": len(rows),
        "prompts": len(groups),
        "kept": len(kept),
        "kept_prompts": len({r["prompt_hash"] for r in kept}),
        "rejected": len(rejected),
        "rejected_by_reason": {k: by_reason[k] for k in REASONS if by_reason[k]},
        "answer_found_rate": sum(r["answer"] is not None for r in rows) / len(rows),
        "teacher_accuracy": sum(r["_norm"] == normalize(r["gold"]) for r in graded) / len(graded) if graded else None,
        "majority_accuracy": (
            sum(g["majority_answer"] == normalize(g["gold"]) for g in majority_graded) / len(majority_graded)
            if majority_graded else None
        ),
        "mean_agreement": sum(g[0]["agreement"] for g in groups.values()) / len(groups),
        "settings": asdict(s),
    }


# Files of a `distill generate` folder that curation never writes over.
GENERATION_FILES = ("generations.jsonl", "generate.json", "budget.json")


def check_outputs(source: Path, out: Path) -> None:
    """Refuse an --out that would overwrite the input (or a generation folder's own files):
    the curated rows, rejected.jsonl and curation.json all go beside `out`."""
    source, out = Path(source), Path(out)
    src = source / "generations.jsonl" if source.is_dir() else source
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the curated rows' file, e.g. {out / 'curated.jsonl'}")
    for target in (out, out.with_name("rejected.jsonl"), out.with_name("curation.json")):
        if target.resolve() == src.resolve() or target.name in GENERATION_FILES:
            raise ConfigError(
                f"--out {out}: curation would write {target}, which is "
                f"{'its own input' if target.resolve() == src.resolve() else 'a generation file'}; choose another --out"
            )


def write_curated(source: Path, out: Path, s: CurateSettings) -> dict:
    """Curate the generations at `source` (a file or a `distill generate` folder) into `out`
    (curated.jsonl), with rejected.jsonl and curation.json beside it. An `out` that would
    overwrite the input is refused (`check_outputs`) before anything is read or written."""
    check_outputs(source, out)
    kept, rejected, summary = curate(read_generations(source), s)
    out = Path(out)
    jsonl = lambda rows: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)  # noqa: E731
    atomic_write_text(out.with_name("rejected.jsonl"), jsonl(rejected))
    atomic_write_json(out.with_name("curation.json"), summary)
    atomic_write_text(out, jsonl(kept))
    return summary
