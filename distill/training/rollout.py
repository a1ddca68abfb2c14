"""Student rollouts for on-policy distillation: batched sampling with a KV cache.

The pieces are small functions over tensors (`prefill`, `decode_step`, `next_tokens`), so
a caller can hand the decode step to torch.compile; `rollout` strings them together:

    prompts (token ids) -> left-padded batch -> prefill (one forward over the prompts,
    filling the cache) -> decode steps (one new token per row and step) until every row
    has written EOS or max_new_tokens -> completions (ids up to and including EOS)

Left padding keeps every row's last prompt token in the last column, so one decode step
appends to all rows at once; positions count real tokens only (attention_mask.cumsum - 1),
so a padded row computes exactly what it would alone.

With a `StaticDecode`, the cache is a transformers StaticCache of a fixed number of slots
and the attention mask is that wide from the start (zeros where nothing is written yet),
so every decode step has the same shapes and the step can be compiled once per size
(torch.compile, dynamic=False) and reused: no per-step tensor growth, no Python overhead
of the model's forward. The numbers equal the dynamic cache's within float rounding only
(attention then sums over the cache's full width).

Sampling is reproducible: each row draws its uniforms from its own generator, seeded by
the caller (the training loop seeds it by run seed, step and example index), so a row's
sample does not depend on which rows share its batch.

The cache goes to the model under the keyword its forward names (`cache_keyword`):
transformers 5 calls it `cache` (the old `past_key_values` still works there, with a
FutureWarning, until 5.40), 4.x only `past_key_values`, and a model silently drops the name
it does not know into **kwargs (it then decodes each new token with no past at all).
"""

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, StaticCache

from distill.models.last_position import last_position


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn."""

    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    min_new_tokens: int = 0  # EOS is not sampled before this many tokens


@dataclass(frozen=True)
class StaticDecode:
    """Decode into a static KV cache as long as the padded prompts plus max_new_tokens,
    rounded up to a multiple of `bucket` (a few sizes, so a few compiles: every slot costs
    attention at every step, so the cache is kept tight), with the decode step compiled by
    torch.compile when `compiled` (and the model has no sliding-window layers:
    `has_sliding_layers`)."""

    bucket: int = 64
    compiled: bool = True

    def length(self, prompt_width: int, max_new_tokens: int) -> int:
        return -(-(prompt_width + max_new_tokens) // self.bucket) * self.bucket


@dataclass
class Rollout:
    """What a rollout produced, per row: completion ids (EOS included when written) and
    whether it ended with EOS."""

    completions: list[list[int]]
    ended: list[bool]

    @property
    def generated_tokens(self) -> int:
        return sum(len(c) for c in self.completions)


def left_pad(prompts: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, P): prompts right-aligned, pad on the left."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a rollout prompt is empty: sampling needs at least one prompt token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only: (B, T) -> (B, T), 0 at each row's first token."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


_CACHE_KEYWORDS: dict[type, str] = {}  # model class -> the keyword its forward takes the KV cache by


def cache_keyword(model) -> str:
    """`cache` or `past_key_values`: the name `model`'s forward gives its KV-cache argument."""
    kind = type(model)
    if kind not in _CACHE_KEYWORDS:
        names = inspect.signature(kind.forward).parameters  # follows transformers' decorators (__wrapped__)
        found = [name for name in ("cache", "past_key_values") if name in names]
        if not found:
            raise TypeError(f"{kind.__name__}.forward takes no KV cache (neither `cache` nor `past_key_values`)")
        _CACHE_KEYWORDS[kind] = found[0]
    return _CACHE_KEYWORDS[kind]


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache) -> torch.Tensor:
    """Run the prompts through the model, filling `cache`. Returns next-token logits (B, V)."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,  # a static cache's is wider than the prompts: zeros after them
        position_ids=positions(attention_mask)[:, : input_ids.shape[1]],
        use_cache=True,
        logits_to_keep=last_position(input_ids),  # not the int 1: see distill.models.last_position
        **{cache_keyword(model): cache},
    )
    return out.logits[:, -1]


def decode_step(model, tokens: torch.Tensor, attention_mask: torch.Tensor, cache) -> torch.Tensor:
    """Append one token per row (tokens: (B,); attention_mask: (B, T) including it; with a
    static cache, T is its length, zeros where nothing is written yet) and return the
    next-token logits (B, V)."""
    out = model(
        input_ids=tokens[:, None],
        attention_mask=attention_mask,
        position_ids=attention_mask.sum(-1, keepdim=True) - 1,
        use_cache=True,
        **{cache_keyword(model): cache},
    )
    return out.logits[:, -1]


@functools.cache
def compiled_decode_step():
    """`decode_step` compiled for fixed shapes (one compile per model, batch and cache
    length, made at its first call)."""
    return torch.compile(decode_step, dynamic=False)


def has_sliding_layers(cache) -> bool:
    """Whether a static cache has sliding-window layers (gemma3's local attention): their
    mask offsets are Python ints that change every step, so a compiled step would be
    compiled again at every step; such models decode uncompiled."""
    return any(getattr(layer, "is_sliding", False) for layer in cache.layers)


def full_forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token logits (B, V) from a forward over the whole sequence, no cache: the
    reference the cached path is tested against."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask), use_cache=False)
    return out.logits[:, -1]


def next_tokens(logits: torch.Tensor, uniforms: torch.Tensor | None, sampling: Sampling) -> torch.Tensor:
    """One token per row from logits (B, V): argmax at temperature 0, otherwise the inverse
    CDF at `uniforms` (B,) of softmax(logits / temperature) after top-k and top-p filtering."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k or sampling.top_p < 1.0:
        k = min(sampling.top_k or logits.shape[-1], logits.shape[-1])
        values, ids = logits.topk(k, dim=-1)  # sorted, largest first
        probs = values.softmax(-1)
        if sampling.top_p < 1.0:
            before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
            probs = probs.masked_fill(before >= sampling.top_p, 0.0)  # keeps the top token
    else:
        ids, probs = None, logits.softmax(-1)
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(-1)).clamp(max=cdf.shape[-1] - 1)
    return pick.squeeze(-1) if ids is None else ids.gather(-1, pick).squeeze(-1)


def row_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s % (2**63)) for s in seeds]


def draw_uniforms(generators: list[torch.Generator]) -> torch.Tensor:
    return torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])


@torch.no_grad()
def rollout(
    model,
    prompts: list[list[int]],
    sampling: Sampling,
    eos_id: int,
    pad_id: int,
    seeds: list[int] | None = None,
    use_cache: bool = True,
    static: StaticDecode | None = None,
) -> Rollout:
    """Sample a completion for each prompt (token ids) from `model`.

    Args:
        seeds: one per prompt (required unless greedy): row i's draws come from its own
            generator, so its sample depends on its seed, prompt and the weights only.
        use_cache: False recomputes the whole sequence at each step (the slow reference).
        static: decode into a static cache (and a compiled step): see `StaticDecode`.
    """
    if sampling.temperature > 0 and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError("sampling at temperature > 0 needs one seed per prompt")
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    generators = row_generators(seeds) if sampling.temperature > 0 else None
    width, step_fn = ids.shape[1], decode_step
    if static is None:
        cache = DynamicCache(config=model.config) if use_cache else None
    else:
        if not use_cache:
            raise ValueError("a static cache decodes with the cache: use_cache must be true")
        length = static.length(width, sampling.max_new_tokens)
        cache, mask = StaticCache(config=model.config, max_cache_len=length), F.pad(mask, (0, length - width))
        if static.compiled and not has_sliding_layers(cache):
            step_fn = compiled_decode_step()
    logits = prefill(model, ids, mask, cache) if use_cache else full_forward_logits(model, ids, mask)
    B = len(prompts)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    steps = []
    for step in range(sampling.max_new_tokens):
        uniforms = draw_uniforms(generators) if generators is not None else None
        if step < sampling.min_new_tokens:
            logits = logits.clone()
            logits[:, eos_id] = float("-inf")
        was_done = finished
        token = next_tokens(logits, uniforms, sampling).masked_fill(was_done, pad_id)  # a finished row pads
        steps.append(token)
        finished = was_done | (token == eos_id)
        if step == sampling.max_new_tokens - 1 or bool(finished.all()):
            break
        if static is None:
            mask = torch.cat([mask, (~was_done).long()[:, None]], dim=1)  # EOS is attended, pads are not
        else:
            mask[:, width + step] = (~was_done).long()
        if use_cache:
            logits = step_fn(model, token, mask, cache)
        else:
            ids = torch.cat([ids, token[:, None]], dim=1)
            logits = full_forward_logits(model, ids, mask)
    generated = torch.stack(steps, dim=1).tolist()  # (B, N)
    completions, ended = [], []
    for row in generated:
        end = row.index(eos_id) + 1 if eos_id in row else len(row)
        completions.append(row[:end])
        ended.append(eos_id in row)
    return Rollout(completions, ended)
