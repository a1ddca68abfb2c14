"""A teacher behind a server (findings 8, 10, 11, 17, 18): a total deadline per request,
replies checked field by field, the API key redacted from any server text, control
characters stripped before printing. Against a real loopback HTTP server (tests/chat_server.py)."""

import json
import time
from pathlib import Path

import pytest
from fault_helpers import one_line

from chat_server import ChatServer, tiny_chat_model

KEY = "sk-test-secret-7c4f2a91"


@pytest.fixture(scope="module")
def tiny():
    return tiny_chat_model()


def _prompts(tmp_path: Path, n: int = 1) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q:{i}+1=", "answer": str((i + 1) % 10)}) + "\n" for i in range(n)))
    return path


def _generate(cli, server, tmp_path, *extra, n: int = 1):
    return cli(
        "generate",
        "--prompts",
        _prompts(tmp_path, n),
        "--out",
        tmp_path / "out",
        "--server",
        server.url,
        "--model",
        "tiny",
        "--max-new-tokens",
        "4",
        "--concurrency",
        "1",
        *extra,
    )


def test_a_dripping_server_cannot_hold_a_request_past_its_deadline(cli, tiny, tmp_path):
    """Finding 8: --timeout bounded each socket read, so one byte every 0.5 s kept a
    `--timeout 2 --max-retries 0` request alive for 134 s. The deadline is now the request's."""
    with ChatServer(*tiny, drip_s=0.2) as server:
        server.faults.append("drip")
        t0 = time.perf_counter()
        result = _generate(cli, server, tmp_path, "--timeout", "1", "--max-retries", "0")
        elapsed = time.perf_counter() - t0
    one_line(result, 1, r"prompt 1 sample 0: gave up after 1 attempts; last: no complete reply within 1 s")
    assert server.dripped < 40  # of a ~280-byte body: cut off after about 1 s, not read to the end
    assert elapsed < 30  # the whole body would have taken a minute


def test_an_echoed_api_key_and_escape_sequences_never_reach_the_terminal(cli, tiny, tmp_path, monkeypatch):
    """Findings 10 and 18: a gateway that echoes the key in its error body had it printed to
    stderr, with its terminal escape sequences."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with ChatServer(*tiny, api_key=KEY) as server:
        server.faults.append("echo")
        result = _generate(cli, server, tmp_path)
    line = one_line(result, 1, r"HTTP 501 .*bad gateway .*you sent Bearer \[redacted\]")
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"  # the key did reach the server
    assert KEY not in result.err + result.out
    assert "\x1b" not in result.err and "\x9b" not in result.err and "\x07" not in result.err
    assert "pwned" not in line  # the window-title sequence went whole
    assert "bad gateway \\x9b31m;" in line  # a lone control character is shown, escaped


def test_an_echoed_api_key_is_not_stored_in_the_rows(cli, tiny, tmp_path, monkeypatch):
    """Finding 10: a refused prompt's error body was written into generations.jsonl."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with ChatServer(*tiny, api_key=KEY) as server:
        server.faults.append("echo400")
        result = _generate(cli, server, tmp_path, n=2)
    assert result.code == 0, result.err
    text = (tmp_path / "out" / "generations.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["finish_reason"] for r in rows].count("error") == 1
    error = next(r["error"] for r in rows if r["finish_reason"] == "error")
    assert error.startswith("HTTP 400") and "Bearer [redacted]" in error and "\x1b" not in error
    for path in (tmp_path / "out").iterdir():
        assert KEY not in path.read_text(), path


@pytest.mark.parametrize("fault", ["usage_str", "usage_list"])
def test_a_usage_that_is_not_counts_is_recorded_as_unknown(cli, tiny, tmp_path, fault):
    """Finding 11: a `usage` string or list crashed generation, and every rerun again."""
    with ChatServer(*tiny) as server:
        server.faults.append(fault)
        first = _generate(cli, server, tmp_path, n=2)
        again = _generate(cli, server, tmp_path, n=2)
    assert first.code == 0 and again.code == 0, first.err + again.err
    rows = [json.loads(line) for line in (tmp_path / "out" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and sorted(r["prompt_tokens"] is None for r in rows) == [False, True]
    summary = json.loads(again.out)
    assert summary["rows"] == 2 and summary["tokens"] is None  # one row's count is unknown, so is the total


def test_rows_an_older_version_stored_with_bad_counts_do_not_crash_a_rerun(cli, tiny, tmp_path):
    out = tmp_path / "out"
    with ChatServer(*tiny) as server:
        assert _generate(cli, server, tmp_path, n=2).code == 0
        rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
        rows[0]["prompt_tokens"] = "n/a"
        (out / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        result = _generate(cli, server, tmp_path, n=2)
    assert result.code == 0, result.err
    assert json.loads(result.out)["prompt_tokens"] is None


def test_a_reply_without_content_is_retried_then_one_line(cli, tiny, tmp_path):
    with ChatServer(*tiny) as server:
        server.faults.extend(["no_content", "no_content"])
        result = _generate(cli, server, tmp_path, "--max-retries", "1")
    one_line(result, 1, r"gave up after 2 attempts; last: a malformed reply \(choices\[0\].message.content is not a string\)")


def test_n_zero_is_an_error_not_every_prompt(cli, tmp_path):
    """Finding 17: `--n 0` generated every prompt."""
    result = cli(
        "generate",
        "--prompts",
        _prompts(tmp_path, 3),
        "--out",
        tmp_path / "out",
        "--server",
        "http://127.0.0.1:9/v1",
        "--model",
        "m",
        "--n",
        "0",
    )
    one_line(result, 2, r"--n 0: give at least 1 prompt")
    assert not (tmp_path / "out").exists()
    one_line(cli("generate", "--prompts", "builtin:chain", "--out", tmp_path / "o2", "--teacher", "x", "--n", "-3"), 2, r"--n -3")
