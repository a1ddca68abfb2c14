"""Step-by-step training views of rows (Distilling Step-by-Step, Hsieh et al. 2023).

A row with a rationale can be learned three ways (`rationale.mode`):

    completion   prompt -> completion                 (rationale then answer, one target)
    answer_only  prompt -> answer                     (the label-only baseline)
    multitask    "predict: " + prompt -> answer       (task 0, the label task)
                 "explain: " + prompt -> rationale    (task 1, the rationale task)

`task_rows` gives one list of rows per task, aligned by row index, so an optimizer step
trains both tasks on the same inputs; the loop weighs them L_label + lambda * L_rationale.
At inference only the label task runs (`eval_rows`), and its whole output is the answer.
"""

from distill.config import RationaleConfig
from distill.data.rows import Row
from distill.errors import DistillError

TASK_NAMES = ("", "rationale_")  # metric prefixes: task_ce, kd, ... and rationale_task_ce, ...


def _check(rows: list[Row], cfg: RationaleConfig, source: str) -> None:
    needs = ("answer", "rationale") if cfg.mode == "multitask" else ("answer",)
    for i, r in enumerate(rows):
        if r.messages is not None:
            raise DistillError(f"{source}: row {i + 1} is a chat row; rationale.mode={cfg.mode} takes prompt/completion rows")
        for key in needs:
            if not getattr(r, key):
                raise DistillError(f"{source}: row {i + 1} has no '{key}' (rationale.mode={cfg.mode} needs {' and '.join(needs)})")


def task_rows(rows: list[Row], cfg: RationaleConfig, source: str = "data") -> list[list[Row]]:
    """One list of training rows per task, aligned by index."""
    if cfg.mode == "completion":
        return [rows]
    _check(rows, cfg, source)
    if cfg.mode == "answer_only":
        return [[Row(r.prompt, r.answer, r.answer) for r in rows]]
    return [
        [Row(cfg.label_prefix + r.prompt, r.answer, r.answer) for r in rows],
        [Row(cfg.rationale_prefix + r.prompt, r.rationale) for r in rows],
    ]


def task_weights(cfg: RationaleConfig) -> list[float]:
    return [1.0, cfg.weight] if cfg.mode == "multitask" else [1.0]


def eval_rows(rows: list[Row], cfg: RationaleConfig) -> list[Row]:
    """The held-out rows as the model is asked at inference: the label task in multitask."""
    if cfg.mode == "completion":
        return rows
    prefix = cfg.label_prefix if cfg.mode == "multitask" else ""
    return [Row(prefix + r.prompt, r.answer, r.answer) for r in rows if r.answer is not None]
