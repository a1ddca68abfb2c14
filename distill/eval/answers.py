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
from decimal import Decimal, InvalidOperation

from distill.errors import ConfigError

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
FORMATS = ("auto", "gsm8k", "boxed", "answer_line", "chain")


def normalize(answer: str) -> str:
    a = answer.strip().rstrip(".").strip().replace("$", "")
    if NUMBER.fullmatch(a):
        try:  # one spelling per number: "1,234.50" == "1234.5", "18.00" == "18"
            d = Decimal(a.replace(",", "")).normalize()
            a = format(d if d != 0 else Decimal(0), "f")
        except InvalidOperation:
            a = a.replace(",", "")
    return a.lower()


LEADING_NUMBER = re.compile(r"\s*\**\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)(?=$|\s|[.,;:!?)*](?:\s|$))")


def _tidy(answer: str) -> str:
    """A line that starts with a number ("72 apples.", "10. Then ...") answers that number."""
    m = LEADING_NUMBER.match(answer)
    return m.group(1) if m else answer.strip(" *")


def _gsm8k(text: str) -> tuple[str, str] | None:
    """'#### 42' on the last non-empty line (a Markdown '#### Step 1' heading above is not one)."""
    head, _, last = text.rstrip().rpartition("\n")
    if "####" not in last:
        return None
    before, _, answer = last.rpartition("####")
    if not answer.strip():
        return None
    return (head + "\n" + before).strip(), _tidy(answer.strip())


def _chain(text: str) -> tuple[str, str] | None:
    """The built-in task: everything after the last '#' is the answer, on one line."""
    if "#" not in text:
        return None
    rationale, answer = text.rsplit("#", 1)
    answer = answer.strip()
    return (rationale.strip(), answer) if answer and "\n" not in answer else None


def _boxed(text: str) -> tuple[str, str] | None:
    """The last \\boxed{...}, braces nested inside it included."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            answer = text[i + 1 : j].strip()
            return (text[:start].strip(), answer) if answer else None
    return None


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


SPLITTERS = {"gsm8k": _gsm8k, "boxed": _boxed, "answer_line": _answer_line, "chain": _chain}


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


def consistent(rationale: str, answer: str) -> bool | None:
    """Does the rationale conclude the stated answer? Its last number, or the result of its
    last equation ('= 18'), must equal a numeric answer; None when either has no number."""
    numbers = NUMBER.findall(rationale)
    if not numbers or not NUMBER.fullmatch(answer.strip().replace("$", "")):
        return None
    results = re.findall(r"=\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", rationale)
    concluded = {normalize(numbers[-1])} | ({normalize(results[-1])} if results else set())
    return normalize(answer) in concluded


def grade(generated: str, answer: str, fmt: str = "chain", direct: bool = False) -> bool:
    """Exact grading after normalisation. direct: the whole text is the answer (the label task
    of step-by-step training); otherwise the format's answer."""
    if direct:
        return normalize(generated) == normalize(answer)
    found = splitter(fmt)(generated)
    if fmt == "chain":  # the built-in task grades exactly: the tail after '#' is the answer
        return found is not None and found[1] == answer.strip()
    return found is not None and normalize(found[1]) == normalize(answer)
