"""A stochastic task with a known truth: sequences from a seeded finite-memory grammar.

A grammar is drawn from a seed. Its sequences are strings of a few letters ("a"-"j" by
default). The next letter depends only on the last `order` letters (100 contexts by
default: order 2), each context mapped at random to one of `n_states` (16) emission states, each with a
next-letter distribution drawn from a Dirichlet (some peaked, some nearly flat). A
sequence ends (the model's EOS) with a per-state stop probability, never before `min_len`
letters and always at `max_len`:

    prompt:     "G:hj"                  (the mark, then the first `order` letters, uniform)
    completion: "gbchdhfdjbchdhgfhh..." (the rest of the sequence, then EOS)

Why it exists: in the chain task the next token is (almost) always determined, so a
teacher's distributions are nearly one-hot and logit distillation carries no more than
the labels. Here the correct next-token distribution has real entropy (about 1.2-1.5
nats per token by default) and is known exactly, because the state is a function of the
prefix. A teacher trained on plenty of data carries dark knowledge (the whole
distribution where a label shows one outcome), and students are scored against the
truth (held-out KL to the true distribution and to the teacher), not only against
sampled labels. The irreducible loss is `entropy_per_token`.

Finite memory rather than a random automaton: random automata only reveal their state
after twenty or more letters, so a model would have to simulate one over the whole
prefix. Here the state is read off the last `order` letters, so the difficulty is data,
not depth. The defaults (order 2, 16 states) are sized for the demo: a 1.06M-parameter
teacher trained on 20,000 sequences gets within 0.006 nats per token (KL) of the truth,
while a 0.1M student that sees 500 sequences' labels stays near 0.08 (docs/results.md).
"""

import hashlib
import math
import random
from dataclasses import dataclass

import torch

PROMPT_MARK = "G:"
END = "<eos>"  # the key of the end of the sequence; the tokenizer's eos token
FLOOR = 1e-3  # probability mixed in uniformly, so every symbol is possible in every state


@dataclass(frozen=True)
class Grammar:
    """A finite-memory stochastic grammar; `make_grammar` draws one from a seed.

    Attributes:
        symbols: The alphabet, one character per symbol.
        order: How many previous symbols form the context.
        classes: The emission state of each context; the context x_1..x_k has index
            sum(idx(x_i) * A**(k - i)), with A the number of symbols.
        emit: emit[s][a]: the probability of symbol a in state s, given no end.
        stop: stop[s]: the probability of ending in state s, once min_len symbols exist.
        min_len: The fewest symbols a sequence has (the prompt's symbols included).
        max_len: The most symbols a sequence has; there it ends with probability 1.
    """

    symbols: str
    order: int
    classes: tuple[int, ...]
    emit: tuple[tuple[float, ...], ...]
    stop: tuple[float, ...]
    min_len: int
    max_len: int

    def __post_init__(self):
        a, n = len(self.symbols), len(self.emit)
        if len(set(self.symbols)) != a or a < 2 or self.order < 1 or len(self.classes) != a**self.order:
            raise ValueError("need >= 2 distinct symbols, order >= 1 and n_symbols**order classes")
        if len(self.stop) != n or any(len(row) != a for row in self.emit) or set(self.classes) - set(range(n)):
            raise ValueError("emit must be (n_states, n_symbols), stop (n_states,), classes index states")
        if any(abs(sum(r) - 1.0) > 1e-9 or min(r) < 0 for r in self.emit) or not all(0 <= p <= 1 for p in self.stop):
            raise ValueError("emit rows must be distributions and stop probabilities in [0, 1]")
        if not self.order <= self.min_len <= self.max_len:
            raise ValueError(f"need order <= min_len <= max_len, got {self.order}, {self.min_len}, {self.max_len}")


@dataclass(frozen=True)
class Sample:
    prompt: str
    completion: str  # the text after the prompt; EOS is not included

    @property
    def target(self) -> str:
        """What the model writes after the prompt (the same name as chain.Problem's)."""
        return self.completion


def make_grammar(
    seed: int,
    n_states: int = 16,
    n_symbols: int = 10,
    order: int = 2,
    concentration: tuple[float, float] = (0.05, 1.0),
    mean_stop: float = 0.06,
    min_len: int = 16,
    max_len: int = 64,
) -> Grammar:
    """Draw a grammar: the same arguments always give the same grammar.

    Args:
        seed: The grammar's seed.
        n_states: Distinct next-symbol distributions; every state gets about
            n_symbols**order / n_states contexts.
        n_symbols: Alphabet size: the first n_symbols lowercase letters.
        order: Context length in symbols.
        concentration: Each state's Dirichlet concentration is log-uniform in this range
            (small: peaked, large: flat).
        mean_stop: Stop probabilities are uniform in [0, 2 * mean_stop].
        min_len: The fewest symbols a sequence has (the prompt's included).
        max_len: The most symbols a sequence has.
    """
    if not 2 <= n_symbols <= 26:
        raise ValueError(f"n_symbols must be in [2, 26], got {n_symbols}")
    if n_states < 1 or n_states > n_symbols**order:
        raise ValueError(f"n_states must be in [1, n_symbols**order], got {n_states}")
    rng = random.Random(f"grammar:{seed}")
    lo, hi = math.log(concentration[0]), math.log(concentration[1])
    emit = []
    for _ in range(n_states):
        alpha = math.exp(rng.uniform(lo, hi))
        g = [rng.gammavariate(alpha, 1.0) for _ in range(n_symbols)]
        total = sum(g)
        row = [(1 - FLOOR) * x / total + FLOOR / n_symbols for x in g]
        emit.append(tuple(x / math.fsum(row) for x in row))  # renormalised against rounding
    classes = [i % n_states for i in range(n_symbols**order)]  # every state used
    rng.shuffle(classes)
    stop = tuple(rng.uniform(0.0, 2 * mean_stop) for _ in range(n_states))
    symbols = "".join(chr(ord("a") + i) for i in range(n_symbols))
    return Grammar(symbols, order, tuple(classes), tuple(emit), stop, min_len, max_len)


def state_of(grammar: Grammar, symbols: str) -> int:
    """The emission state after a sequence of symbols (it needs at least `order` of them)."""
    if len(symbols) < grammar.order:
        raise ValueError(f"the state needs {grammar.order} symbols, got {symbols!r}")
    index = 0
    for ch in symbols[-grammar.order :]:
        index = index * len(grammar.symbols) + grammar.symbols.index(ch)
    return grammar.classes[index]


def _end_prob(grammar: Grammar, t: int, state: int) -> float:
    """The probability of ending after t symbols in a state."""
    return 0.0 if t < grammar.min_len else 1.0 if t >= grammar.max_len else grammar.stop[state]


def next_probs(grammar: Grammar, symbols: str) -> dict[str, float]:
    """The exact distribution of what follows a sequence of symbols: {symbol or END: prob}."""
    if len(symbols) > grammar.max_len or not set(symbols) <= set(grammar.symbols):
        raise ValueError(f"{symbols!r} is not a sequence of {grammar.symbols!r} of at most {grammar.max_len}")
    s = state_of(grammar, symbols)
    p_end = _end_prob(grammar, len(symbols), s)
    out = {ch: (1.0 - p_end) * p for ch, p in zip(grammar.symbols, grammar.emit[s])}
    out[END] = p_end
    return out


def sample_row(grammar: Grammar, rng: random.Random) -> Sample:
    """One draw from the process: `order` uniform symbols as the prompt, then the grammar."""
    seq = [rng.choice(grammar.symbols) for _ in range(grammar.order)]
    while True:
        s = state_of(grammar, seq)
        p_end = _end_prob(grammar, len(seq), s)
        if p_end > 0.0 and rng.random() < p_end:
            break
        seq.append(rng.choices(grammar.symbols, weights=grammar.emit[s])[0])
    return Sample(PROMPT_MARK + "".join(seq[: grammar.order]), "".join(seq[grammar.order :]))


def _split_of(text: str, seed: int) -> str:
    """Assign a sequence to a split by hashing it, so no sequence is in two splits."""
    h = int.from_bytes(hashlib.sha256(f"grammar:{seed}:{text}".encode()).digest()[:8], "big") % 100
    return "test" if h < 10 else "val" if h < 15 else "train"


def generate_split(split: str, n: int, seed: int = 0, grammar: Grammar | None = None) -> list[Sample]:
    """Deterministic rows of one split ("train", "val" or "test").

    Rows are independent draws from the grammar (`make_grammar(seed)` unless one is
    given), kept when the sequence hashes to this split: the same arguments give the same
    rows, a larger n extends a smaller one, and no prompt + completion is in two splits.
    Repeats within a split are kept: removing them would bias rows away from the truth.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    grammar = make_grammar(seed) if grammar is None else grammar
    rng = random.Random(f"grammar-rows:{seed}:{split}")
    out = []
    while len(out) < n:
        row = sample_row(grammar, rng)
        if _split_of(row.prompt + row.completion, seed) == split:
            out.append(row)
    return out


def true_next_token_probs(grammar: Grammar, prompt: str, completion: str) -> list[dict[str, float]]:
    """The exact next-symbol distribution at every target of a row.

    Args:
        grammar: The grammar the row is scored against.
        prompt: PROMPT_MARK and at least `order` symbols.
        completion: Symbols after the prompt (EOS not included); it may be any string of
            the grammar's symbols, such as a model's generation, up to max_len in all.

    Returns:
        len(completion) + 1 dicts, {symbol or END: probability}: the distribution of each
        completion character, then of the end, given everything before it.
    """
    if not prompt.startswith(PROMPT_MARK):
        raise ValueError(f"a grammar prompt starts with {PROMPT_MARK!r}, got {prompt!r}")
    text = prompt[len(PROMPT_MARK) :] + completion
    return [next_probs(grammar, text[:t]) for t in range(len(text) - len(completion), len(text) + 1)]


def true_probs_tensor(
    grammar: Grammar, prompt: str, completion: str, tokenizer, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The true distributions of a row's targets over a tokenizer's vocabulary: (n, V).

    Row i (n = len(completion) + 1 rows, each summing to 1) is the target of completion
    character i, the last one the EOS: the positions `rows.tokenize_rows` labels.
    """
    keys = list(grammar.symbols) + [END]
    ids = [tokenizer.convert_tokens_to_ids(ch) for ch in grammar.symbols] + [tokenizer.eos_token_id]
    if None in ids or tokenizer.unk_token_id in ids:
        raise ValueError("the tokenizer has no token for some of the grammar's symbols, or no eos token")
    dists = true_next_token_probs(grammar, prompt, completion)
    probs = torch.tensor([[d[k] for k in keys] for d in dists], dtype=dtype)  # (n, A + 1)
    out = torch.zeros(len(dists), len(tokenizer), dtype=dtype)  # (n, V)
    out[:, ids] = probs
    return out


def kl_to_truth(truth: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(truth || softmax(logits)) per target, in nats; truth (n, V), logits (n, V) -> (n,)."""
    logq = torch.log_softmax(logits.to(torch.float64), dim=-1)  # (n, V)
    p = truth.to(torch.float64)  # (n, V)
    return torch.where(p > 0, p * (torch.log(p.clamp_min(1e-300)) - logq), 0.0).sum(-1)  # (n,)


def entropy_per_token(grammar: Grammar, samples: list[Sample]) -> float:
    """The mean true entropy over all targets of the samples (EOS included), in nats.

    The irreducible loss: a perfect model's held-out cross-entropy per token, in expectation.
    """
    total, count = 0.0, 0
    for s in samples:
        for dist in true_next_token_probs(grammar, s.prompt, s.completion):
            total -= sum(p * math.log(p) for p in dist.values() if p > 0)
            count += 1
    return total / count if count else 0.0
