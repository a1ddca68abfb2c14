"""The built-in reasoning task: a chain of modular arithmetic steps.

A problem is a start digit and a list of operations, each applied to the running value
modulo 10. The rationale writes out every intermediate step; the answer is the last value:

    prompt:    "Q:7+3*2-5+8="
    rationale: "7+3=0*2=0-5=5+8=3"   (each step: the next operation, then the new value)
    answer:    "3"
    target:    "7+3=0*2=0-5=5+8=3#3"  (rationale, '#', answer, then EOS)

Every step is easy; getting all of them right is not: the model has to find the k-th
operation in the prompt, carry the running value and know the 300-entry table of digit
operations. A small model trained on the same steps gets many chains wrong, which is what
lets distillation methods be told apart. Grading is exact: the text after the last '#'
must equal the answer.
"""

import hashlib
import random
from dataclasses import dataclass

from distill.errors import ConfigError

OPS = {"+": lambda a, b: (a + b) % 10, "-": lambda a, b: (a - b) % 10, "*": lambda a, b: (a * b) % 10}
ANSWER_MARK = "#"
# A well-formed generation: the start digit, steps "<op><digit>=<digit>", '#', one digit.
FORMAT_REGEX = r"\d(?:[-+*]\d=\d)*#\d"
ANSWER_REGEX = r"\d"  # the label task's whole output: the answer digit alone


@dataclass(frozen=True)
class Problem:
    prompt: str
    rationale: str
    answer: str

    @property
    def target(self) -> str:
        """What the model writes after the prompt: rationale, mark, answer."""
        return f"{self.rationale}{ANSWER_MARK}{self.answer}"


def make_problem(rng: random.Random, min_ops: int, max_ops: int) -> Problem:
    value = rng.randrange(10)
    n_ops = rng.randint(min_ops, max_ops)
    ops = [(rng.choice("+-*"), rng.randrange(10)) for _ in range(n_ops)]
    prompt = f"Q:{value}" + "".join(f"{op}{b}" for op, b in ops) + "="
    rationale = str(value)
    for op, operand in ops:
        value = OPS[op](value, operand)
        rationale += f"{op}{operand}={value}"
    return Problem(prompt=prompt, rationale=rationale, answer=str(value))


def _split_of(prompt: str, seed: int) -> str:
    """Assign a problem to a split by hashing its prompt, so no prompt is in two splits."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{prompt}".encode()).digest()[:8], "big") % 100
    return "test" if h < 10 else "val" if h < 15 else "train"


def generate_split(split: str, n: int, seed: int = 0, min_ops: int = 3, max_ops: int = 6) -> list[Problem]:
    """Deterministic problems of one split ("train", "val" or "test").

    The same (seed, min_ops, max_ops) always gives the same problems, and a prompt belongs
    to exactly one split whatever n is, so a larger train set never leaks test prompts.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    rng = random.Random(f"chain:{seed}:{split}")
    out, seen = [], set()
    # Distinct prompts there are (a start digit, then per operation one of 3 x 10): past
    # 20 times that many draws in a row with nothing new, the split has no more to give.
    distinct = sum(10 * 30**k for k in range(min_ops, min(max_ops, 8) + 1)) if max_ops < 9 else 10**13
    misses = 0
    while len(out) < n:
        p = make_problem(rng, min_ops, max_ops)
        if p.prompt in seen or _split_of(p.prompt, seed) != split:
            misses += 1
            if misses > 20 * distinct + 1000:
                raise ConfigError(
                    f"data.n_{'train' if split == 'train' else 'test'}={n}: the built-in chain task has only {len(out)} "
                    f"distinct {split} problems with {min_ops} to {max_ops} operations; raise data.max_ops or ask for fewer"
                )
            continue
        misses = 0
        seen.add(p.prompt)
        out.append(p)
    return out


def grade(generated: str, answer: str) -> bool:
    """Exact grading: the text after the last answer mark, stripped, equals the answer."""
    if ANSWER_MARK not in generated:
        return False
    return generated.rsplit(ANSWER_MARK, 1)[1].strip() == answer
