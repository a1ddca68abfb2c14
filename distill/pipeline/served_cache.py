"""A served teacher's top-k for the teacher cache: `distill cache --server URL --model NAME`.

vLLM's OpenAI-compatible `/v1/completions` takes a prompt as token ids and, with its
`prompt_logprobs: k` extension, returns for every prompt position after the first the
log-probabilities of the k most likely tokens (ranks 1..k) and of the prompt's own token
(whose rank may be past k):

    {"choices": [{"prompt_logprobs": [null,
        {"791": {"logprob": -0.21, "rank": 1, "decoded_token": " the"}, ...}, ...]}]}

Entry j is the teacher's distribution of token j given tokens 0..j-1: for every target of
an example that is exactly what `distill cache` stores for a local teacher (top-k ids, their
log-probabilities, and the log of the leftover mass, computed here as log(1 - sum p_top)).
vLLM's prompt log-probs are the model's raw ones, at temperature 1: a cache for a run at
another temperature is refused (the leftover mass of a top-k cannot be re-tempered).

The ids are sent as they are (no special tokens added by the server); a packed block is sent
one document at a time, so that no document sees another, as with a local teacher. A reply
is checked before anything is stored: one distribution per position, none missing where a
target is, exactly k ranked entries, and the position's own token among them (log-probs of
some other sequence than the one asked about mean the server tokenized or templated it):
a reply that fails is named in a one-line error.
"""

import math

import httpx
import torch

from distill.data.rows import Example
from distill.errors import DistillError
from distill.loss.token_losses import IGNORE_INDEX
from distill.pipeline.chat_client import MalformedReply, ServerSettings, complete_all, post_json
from distill.pipeline.generate import run_coroutine

ROUTE = "/completions"


def documents(example: Example) -> list[tuple[int, int]]:
    """[start, end) of each document of an example: one, or the documents of a packed block."""
    if example.position_ids is None:
        return [(0, len(example.input_ids))]
    starts = [i for i, p in enumerate(example.position_ids) if p == 0]
    return list(zip(starts, [*starts[1:], len(example.input_ids)]))


def request_body(model: str, ids: list[int], k: int) -> dict:
    return {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k}


def parse_prompt_logprobs(body) -> list:
    """choices[0].prompt_logprobs of a /completions reply (MalformedReply without it)."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise MalformedReply("no choices[0]")
    entries = choices[0].get("prompt_logprobs")
    if not isinstance(entries, list):
        raise MalformedReply("choices[0].prompt_logprobs is not a list (does the server support prompt_logprobs?)")
    return entries


def _ranked(entry, position: int, token: int, k: int, vocab: int, what: str) -> tuple[list[int], list[float]]:
    """The k ranked (id, log-prob) of one position's entry, best first; checked."""
    if not isinstance(entry, dict):
        raise DistillError(f"{what}: no log-probabilities at prompt position {position}")
    ranked = []
    for key, value in entry.items():
        try:
            tid, logprob, rank = int(key), float(value["logprob"]), value.get("rank")
        except (TypeError, ValueError, KeyError):
            raise DistillError(f"{what}: position {position}: entry {key!r} is not a token id with a logprob") from None
        if not 0 <= tid < vocab:
            raise DistillError(f"{what}: position {position}: token id {tid} is outside the vocabulary of {vocab}")
        if math.isnan(logprob) or logprob > 1e-4:
            raise DistillError(f"{what}: position {position}: log-probability {logprob} of token {tid} is not <= 0")
        if isinstance(rank, int) and 1 <= rank <= k:
            ranked.append((rank, tid, min(logprob, 0.0)))
    if str(token) not in entry:
        raise DistillError(
            f"{what}: position {position}: the reply has no log-probability for the prompt's own token {token}; "
            f"the server scored another sequence than the token ids sent (does it add special tokens or a template?)"
        )
    if len(ranked) < k:
        raise DistillError(
            f"{what}: position {position}: {len(ranked)} ranked log-probabilities, --top-k asked for {k} "
            f"(vLLM caps them at its --max-logprobs)"
        )
    ranked.sort()
    return [t for _, t, _ in ranked[:k]], [lp for _, _, lp in ranked[:k]]


def example_topk(
    example: Example, replies: list[list], k: int, vocab: int, what: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (n, k), logprobs (n, k), rest (n,) at the example's n targets, from the replies to
    its documents."""
    ids, logprobs = [], []
    for (start, end), entries in zip(documents(example), replies):
        if len(entries) != end - start:
            raise DistillError(f"{what}: {len(entries)} prompt log-probability entries for a prompt of {end - start} tokens")
        for j in range(start + 1, end):
            if example.labels[j] != IGNORE_INDEX:
                top_ids, top_lp = _ranked(entries[j - start], j - start, example.input_ids[j], k, vocab, what)
                ids.append(top_ids)
                logprobs.append(top_lp)
    lp = torch.tensor(logprobs, dtype=torch.float64).reshape(-1, k)
    left = 1.0 - lp.exp().sum(-1)  # the mass outside the top-k
    rest = torch.where(left > 1e-12, left.clamp_min(1e-300).log(), -torch.inf)
    return torch.tensor(ids, dtype=torch.int64).reshape(-1, k), lp.float(), rest.float()


def served_topk(
    settings: ServerSettings, examples: list[Example], k: int, vocab: int, first_index: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The served teacher's top-k at every target of `examples`, in example order: ids (n, k)
    int64, logprobs (n, k) float32, rest (n,) float32, as `pipeline.cache.teacher_topk`."""
    requests = []
    for i, example in enumerate(examples):
        for d, (start, end) in enumerate(documents(example)):
            what = f"example {first_index + i}" + (f" document {d}" if example.position_ids is not None else "")
            requests.append(((i, d), request_body(settings.model, example.input_ids[start:end], k), what))
    replies: dict[tuple[int, int], list] = {}

    async def send(client: httpx.AsyncClient, s: ServerSettings, body: dict, what: str):
        entries, error, _ = await post_json(client, s, ROUTE, body, what, parse_prompt_logprobs)
        if error is not None:
            raise DistillError(f"{s.base_url.rstrip('/')}{ROUTE}: {what}: the server refused it: {error}")
        return entries

    def on_reply(key, entries) -> None:
        replies[key] = entries

    run_coroutine(complete_all(settings, requests, on_reply, send=send))
    parts = []
    for i, example in enumerate(examples):
        per_doc = [replies[(i, d)] for d in range(len(documents(example)))]
        parts.append(example_topk(example, per_doc, k, vocab, f"{settings.base_url.rstrip('/')}{ROUTE}: example {first_index + i}"))
    return tuple(torch.cat([p[j] for p in parts]) for j in range(3))  # type: ignore[return-value]
