"""Release gates: thresholds on evaluation metrics that a student must pass to ship.

    gates:
      accuracy: ">= 0.9 * teacher"      # at least 90% of the teacher's accuracy
      length_drift_p90: "<= 1.2"        # p90 generation length at most 1.2x the teacher's
      ece: "<= 0.05"

An expression is an operator (>=, <=, >, <, ==) then a number, `teacher`, or `NUMBER *
teacher`, where `teacher` is the teacher's value of the same metric (accuracy, heldout_ce
and perplexity only: the teacher's own evaluation). `distill eval RUN --gates` prints the
results and exits with code 3 when a gate fails; a gate whose metric is missing from the
evaluation (no teacher, no gold answers, no format set) fails with its reason.
"""

import math
import operator
import re
from dataclasses import dataclass

from rich.table import Table

from distill.errors import DistillError

# metric -> (section of eval.json or None for the top level, key there, description)
METRICS: dict[str, tuple[str | None, str, str]] = {
    "accuracy": (None, "accuracy", "Exact-match accuracy; may compare to the teacher's: '>= 0.9 * teacher'."),
    "heldout_ce": (None, "heldout_ce", "Held-out cross-entropy (nats per token); may compare to the teacher's."),
    "perplexity": (None, "perplexity", "exp(heldout_ce); may compare to the teacher's."),
    "agreement_top1": (None, "agreement_top1", "Share of completion tokens where both models' most likely next token agree."),
    "forward_kl": ("divergences", "forward_kl", "Held-out KL(teacher || student) per token at T = 1."),
    "reverse_kl": ("divergences", "reverse_kl", "Held-out KL(student || teacher) per token at T = 1."),
    "jsd": ("divergences", "jsd", "Held-out normalised JSD (beta 0.5) per token at T = 1."),
    "tvd": ("divergences", "tvd", "Held-out total variation distance per token."),
    "length_drift_mean": ("length", "mean_ratio", "Mean greedy generation length of the student / the teacher's."),
    "length_drift_p90": ("length", "p90_ratio", "90th-percentile generation length of the student / the teacher's."),
    "ece": ("calibration", "ece", "Expected calibration error of the answer confidence."),
    "refusal_rate": (None, "refusal_rate", "Share of generations matching eval.refusal_patterns."),
    "format_adherence": (None, "format_adherence", "Share of generations in eval.format_regex / eval.format_json_schema."),
}
RELATIVE_METRICS = ("accuracy", "heldout_ce", "perplexity")  # the teacher is evaluated on these
OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_EXPR = re.compile(rf"\s*(>=|<=|==|>|<)\s*(?:(?P<factor>{_NUMBER})\s*\*\s*teacher|(?P<teacher>teacher)|(?P<number>{_NUMBER}))\s*")


class GateFailure(DistillError):
    """A release gate failed: exit code 3."""

    exit_code = 3


@dataclass(frozen=True)
class Gate:
    """One parsed gate: `metric op value`, value = factor (x the teacher's value if relative)."""

    metric: str
    expr: str
    op: str
    factor: float
    relative: bool


def parse_gate(metric: str, expr: str) -> Gate:
    """Parse `expr` as a gate on `metric`.

    Raises:
        ValueError: an unknown metric, a malformed expression, or `teacher` on a metric the
            teacher is not evaluated on (one line, for the config's error message).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown gate metric {metric!r} (one of {', '.join(METRICS)})")
    m = _EXPR.fullmatch(expr)
    if m is None:
        raise ValueError(
            f"malformed gate {expr!r}: expected an operator (>=, <=, >, <, ==) then a number, 'teacher' or "
            f"'NUMBER * teacher', e.g. '>= 0.9 * teacher'"
        )
    relative = m["number"] is None
    if relative and metric not in RELATIVE_METRICS:
        raise ValueError(f"gate {expr!r}: 'teacher' is only known for {', '.join(RELATIVE_METRICS)}, not {metric}")
    factor = float(m["factor"]) if m["factor"] is not None else 1.0 if relative else float(m["number"])
    return Gate(metric, expr, m.group(1), factor, relative)


def metric_value(result: dict, metric: str) -> float | None:
    """The value of a gate metric in an eval.json tree; None where the evaluation lacks it."""
    section, key, _ = METRICS[metric]
    node = result if section is None else result.get(section) or {}
    return node.get(key)


def check_gates(gates: dict[str, str], result: dict) -> dict:
    """Evaluate gates against an evaluation.

    Args:
        gates: metric -> expression, as validated by the run config.
        result: the eval.json tree (teacher values under result["teacher"]).

    Returns:
        {"passed": every gate passed, "results": [{"metric", "expr", "value", "threshold",
        "passed"}, plus "reason" where the value or the teacher's value is missing]}.
    """
    results = []
    for metric, expr in gates.items():
        gate = parse_gate(metric, expr)
        value = metric_value(result, metric)
        entry = {"metric": metric, "expr": expr, "value": value, "threshold": None, "passed": False}
        reference = (result.get("teacher") or {}).get(metric) if gate.relative else 1.0
        if reference is None:
            entry["reason"] = (
                f"no teacher {metric} in this evaluation (the run has no teacher, eval.teacher is false, "
                f"or no held-out row has a gold answer)"
            )
        else:
            entry["threshold"] = gate.factor * reference
            if value is None:
                entry["reason"] = f"{metric} was not measured in this evaluation"
            elif not (math.isfinite(value) and math.isfinite(entry["threshold"])):
                entry["reason"] = f"{metric} {value} against {entry['threshold']}: not a finite comparison"
            else:
                entry["passed"] = bool(OPERATORS[gate.op](value, entry["threshold"]))
        results.append(entry)
    return {"passed": all(r["passed"] for r in results), "results": results}


def gates_table(report: dict):
    """A rich Table of gate results: metric, expression, value, threshold, pass / FAIL."""
    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.4g}"

    n_pass = sum(r["passed"] for r in report["results"])
    table = Table(title=f"release gates: {n_pass}/{len(report['results'])} passed")
    for col in ("metric", "gate", "value", "threshold", "result"):
        table.add_column(col, justify="right" if col in ("value", "threshold") else "left")
    for r in report["results"]:
        verdict = "[green]pass[/]" if r["passed"] else "[red]FAIL[/]" + (f" ({r['reason']})" if "reason" in r else "")
        table.add_row(r["metric"], r["expr"], num(r["value"]), num(r["threshold"]), verdict)
    return table
