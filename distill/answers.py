"""Final answers in generated text: where they are, how they compare.

A completion that reasons before answering is split into (rationale, answer) by an answer
format. The formats cover the common conventions; "auto" tries them in order:

    gsm8k        "... #### 42"              (the text after the last '####')
    boxed        "... \\boxed{42} ..."       (the last \\boxed{...})
    answer_line  "... Answer: 42"           (after the last 'Answer:' / 'the answer is')
    chain        "7+3=0*2=0#0"              (the built-in task: after the last '#')
    regex:PAT    a regular expression whose first group is the answer

Answers are compared after `normalize`: surrounding space, a trailing period, '$' and the
thousands commas of numbers do not count ("$1,234." == "1234").
"""

import re
from collections.abc import Callable

from distill.errors import ConfigError

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
FORMATS = ("auto", "gsm8k", "boxed", "answer_line", "chain")


def normalize(answer: str) -> str:
    a = answer.strip().rstrip(".").strip().replace("$", "")
    if NUMBER.fullmatch(a):
        a = a.replace(",", "")
    return a.lower()


LEADING_NUMBER = re.compile(r"\s*\**\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)(?![\d,]*\.\d)")


def _tidy(answer: str) -> str:
    """A line that starts with a number ("72 apples.", "10. Then ...") answers that number."""
    m = LEADING_NUMBER.match(answer)
    return m.group(1) if m else answer.strip(" *")


def _after_last(mark: str) -> Callable[[str], tuple[str, str] | None]:
    def split(text: str) -> tuple[str, str] | None:
        if mark not in text:
            return None
        rationale, answer = text.rsplit(mark, 1)
        answer = _tidy(answer.strip().splitlines()[0]) if answer.strip() else ""
        return (rationale.strip(), answer.strip()) if answer.strip() else None

    return split


def _boxed(text: str) -> tuple[str, str] | None:
    matches = list(re.finditer(r"\\boxed\{([^{}]*)\}", text))
    if not matches:
        return None
    m = matches[-1]
    return text[: m.start()].strip(), m.group(1).strip()


_ANSWER_LINE = re.compile(r"\banswer\**\s*(?:is\b\s*:?|[:=])\s*\**\s*([^\n]*)", re.IGNORECASE)


def _answer_line(text: str) -> tuple[str, str] | None:
    matches = [m for m in _ANSWER_LINE.finditer(text) if m.group(1).strip(" *.")]
    if not matches:
        return None
    m = matches[-1]
    return text[: m.start()].strip(), _tidy(m.group(1))


def _regex(pattern: str) -> Callable[[str], tuple[str, str] | None]:
    try:
        rx = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ConfigError(f"answer format 'regex:{pattern}': not a valid regular expression ({e})") from None
    if rx.groups < 1:
        raise ConfigError(f"answer format 'regex:{pattern}': needs a capture group for the answer")

    def split(text: str) -> tuple[str, str] | None:
        matches = list(rx.finditer(text))
        if not matches or not matches[-1].group(1).strip():
            return None
        m = matches[-1]
        return text[: m.start()].strip(), m.group(1).strip()

    return split


SPLITTERS = {"gsm8k": _after_last("####"), "boxed": _boxed, "answer_line": _answer_line, "chain": _after_last("#")}


def splitter(fmt: str) -> Callable[[str], tuple[str, str] | None]:
    """The (rationale, answer) splitter of an answer format; None from it: no answer found."""
    if fmt.startswith("regex:"):
        return _regex(fmt.removeprefix("regex:"))
    if fmt == "auto":
        order = [SPLITTERS[k] for k in ("gsm8k", "boxed", "answer_line", "chain")]
        return lambda text: next((r for r in (s(text) for s in order) if r is not None), None)
    if fmt not in SPLITTERS:
        raise ConfigError(f"unknown answer format {fmt!r} (one of {', '.join(FORMATS)} or regex:PATTERN)")
    return SPLITTERS[fmt]


def conclusion(rationale: str) -> str | None:
    """What a rationale concludes: its last number (the built-in task's last '=value'), or
    None when it states no number."""
    numbers = NUMBER.findall(rationale)
    return numbers[-1] if numbers else None


def grade(generated: str, answer: str, fmt: str = "chain", direct: bool = False) -> bool:
    """Exact grading after normalisation. direct: the whole text is the answer (the label task
    of step-by-step training); otherwise the format's answer."""
    if direct:
        return normalize(generated) == normalize(answer)
    found = splitter(fmt)(generated)
    return found is not None and normalize(found[1]) == normalize(answer)
