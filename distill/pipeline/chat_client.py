"""A client for any OpenAI-compatible server (vLLM, SGLang, llama.cpp): chat completions, and
any other JSON route (`post_json`: the prompt log-probs of `distill cache --server`).

Requests go out concurrently (at most `concurrency` in flight), each with a deadline for the
whole request (connect, send, every byte of the reply: a server that drips its reply does
not hold a request past it). A 429, a 5xx, a dropped connection, a missed deadline or a
malformed reply is retried with exponential backoff and jitter (a server's Retry-After
wins). A 400, 413 or 422 refuses that one request (too long a prompt, say): it comes back
as an error reply; any other error status stops everything.

Replies are checked field by field: choices[0].message.content must be a string; a
finish_reason that is not a string, and a usage that is not a mapping of non-negative
integers, are recorded as unknown (null). The API key is read from an environment
variable, sent as a bearer token and never logged, printed or written: any server text
(an error body, a completion) has it replaced by [redacted] before it is shown or stored,
and error text is stripped of control characters and escape sequences before printing.
"""

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from distill.errors import DistillError, printable

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
REFUSED_STATUS = {400, 413, 422}  # this request is refused (too long, bad parameter): an error row, not a stop


@dataclass(frozen=True)
class ServerSettings:
    base_url: str
    """Up to and including the API version: http://localhost:8000/v1."""
    model: str
    """The model name the server knows the teacher by."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Environment variable holding the API key (no Authorization header when unset)."""
    concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    seconds: float
    retries: int
    error: str | None = None  # the server refused this request (REFUSED_STATUS)


def _api_key(settings: ServerSettings) -> str | None:
    return (os.environ.get(settings.api_key_env) or None) if settings.api_key_env else None


def _headers(settings: ServerSettings) -> dict[str, str]:
    key = _api_key(settings)
    return {"Authorization": f"Bearer {key}"} if key else {}


def redact(text: str, key: str | None) -> str:
    """`text` with every occurrence of the API key replaced by [redacted]."""
    return text.replace(key, "[redacted]") if key else text


class MalformedReply(ValueError):
    """A 200 reply without what a chat completion must hold; names the field."""


def _count(usage: dict, name: str) -> int | None:
    value = usage.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _parse(body) -> tuple[str, str | None, int | None, int | None]:
    """(content, finish_reason, prompt_tokens, completion_tokens) of a reply body."""
    if not isinstance(body, dict):
        raise MalformedReply(f"the body is a JSON {type(body).__name__}, not an object")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise MalformedReply("no choices[0]")
    message = choices[0].get("message")
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        raise MalformedReply("choices[0].message.content is not a string")
    finish = choices[0].get("finish_reason")
    usage = body.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    finish = finish if isinstance(finish, str) else None
    return message["content"], finish, _count(usage, "prompt_tokens"), _count(usage, "completion_tokens")


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


async def post_json(
    client: httpx.AsyncClient, settings: ServerSettings, route: str, body: dict, what: str, parse: Callable[[object], object]
) -> tuple[object | None, str | None, int]:
    """POST `body` to base_url + route, retried as the module says; `what` names the request
    in errors. Returns (parse(reply JSON), None, retries), or (None, error, retries) when the
    server refuses this one request (REFUSED_STATUS). `parse` raises MalformedReply for a
    reply without what the route must return: retried like a dropped connection."""
    url = settings.base_url.rstrip("/") + route
    key = _api_key(settings)
    for attempt in range(settings.max_retries + 1):
        wait = None
        try:
            # The deadline covers the whole request: httpx's own timeout bounds each read only.
            response = await asyncio.wait_for(client.post(url, json=body), settings.timeout_s)
        except TimeoutError:
            why = f"no complete reply within {settings.timeout_s:g} s"
        except httpx.TransportError as e:  # refused, dropped mid-reply, timed out
            why = f"{type(e).__name__}"
        else:
            if response.status_code == 200:
                try:
                    return parse(response.json()), None, attempt
                except MalformedReply as e:
                    why = f"a malformed reply ({e})"
                except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested past reading
                    why = f"a malformed reply ({type(e).__name__})"
            elif response.status_code in RETRY_STATUS:
                why, wait = f"HTTP {response.status_code}", _retry_after(response)
            else:
                lines = redact(response.text, key).strip().splitlines()
                detail = printable(lines[0], 200) if lines else ""
                if response.status_code in REFUSED_STATUS:
                    return None, f"HTTP {response.status_code} {detail}".rstrip(), attempt
                hint = f" (check the key in ${settings.api_key_env})" if response.status_code in (401, 403) else ""
                raise DistillError(f"{url}: {what}: HTTP {response.status_code}{hint} {detail}".rstrip())
        if attempt == settings.max_retries:
            raise DistillError(f"{url}: {what}: gave up after {attempt + 1} attempts; last: {why}")
        if wait is None:
            wait = min(settings.max_backoff_s, settings.backoff_s * 2**attempt) * (0.5 + random.random() / 2)
        await asyncio.sleep(min(wait, settings.max_backoff_s))
    raise AssertionError("unreachable")


async def complete(client: httpx.AsyncClient, settings: ServerSettings, body: dict, what: str) -> Reply:
    """One chat completion (POST /chat/completions), retried as the module says."""
    key = _api_key(settings)
    t0 = time.perf_counter()
    parsed, error, retries = await post_json(client, settings, "/chat/completions", body, what, _parse)
    if error is not None:
        return Reply("", "error", 0, 0, time.perf_counter() - t0, retries, error)
    text, finish, p_tok, c_tok = parsed  # type: ignore[misc]
    return Reply(redact(text, key), finish, p_tok, c_tok, time.perf_counter() - t0, retries)


async def complete_all(
    settings: ServerSettings,
    requests: list[tuple[object, dict, str]],
    on_reply: Callable[[object, Reply], Awaitable[None] | None],
    send: Callable[[httpx.AsyncClient, ServerSettings, dict, str], Awaitable[object]] = complete,
) -> None:
    """Send every (key, body, what) request with `send` (a chat completion unless told
    otherwise; `what` names it in errors), at most `concurrency` at a time; call
    on_reply(key, reply) as each one finishes, in completion order. The first request that
    fails for good cancels the rest and raises its error (replies already handed over stay
    handed over)."""
    queue: asyncio.Queue = asyncio.Queue()
    for item in requests:
        queue.put_nowait(item)
    timeout = httpx.Timeout(settings.timeout_s)
    limits = httpx.Limits(max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            try:
                key, body, what = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            reply = await send(client, settings, body, what)
            result = on_reply(key, reply)
            if asyncio.iscoroutine(result):
                await result

    async with httpx.AsyncClient(headers=_headers(settings), timeout=timeout, limits=limits) as client:
        workers = [asyncio.create_task(worker(client)) for _ in range(max(1, settings.concurrency))]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

