"""`distill generate`: local and server teachers, retries, resumability after kill -9."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from distill.data.rows import builtin_rows
from distill.errors import ConfigError, DistillError
from distill.eval.evaluate import generate_greedy
from distill.pipeline.chat_client import ServerSettings
from distill.pipeline.generate import GenerateSettings, RowFile, prompt_hash, run_generate

from chat_server import ChatServer, tiny_chat_model

SETTINGS = GenerateSettings(temperature=1.0, max_new_tokens=12, samples=2, seed=3)


@pytest.fixture(scope="module")
def tiny():
    return tiny_chat_model()


@pytest.fixture(scope="module")
def teacher_dir(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    model, tok = tiny
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_prompts(path: Path, n: int) -> Path:
    """Prompts of varied lengths (3 to 9 operations), so batches pad."""
    prompts = [f"Q:{i % 10}" + "+1*2" * (1 + i % 4) + f"-{i // 10}=" for i in range(n)]
    path.write_text("".join(json.dumps({"prompt": p, "answer": str(i % 7)}) + "\n" for i, p in enumerate(prompts)))
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def fast(url: str, **kw) -> ServerSettings:
    return ServerSettings(url, "tiny", **{"concurrency": 3, "timeout_s": 5.0, "backoff_s": 0.01, "max_backoff_s": 0.05, **kw})


def test_server_rows_carry_provenance_and_budget(tiny, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 5)
    with ChatServer(*tiny) as server:
        summary = run_generate(str(prompts), tmp_path / "out", SETTINGS, server=fast(server.url), progress=False)
    rows = read_rows(tmp_path / "out" / "generations.jsonl")
    assert summary["rows"] == len(rows) == 10 and len({r["key"] for r in rows}) == 10
    for r in rows:
        assert r["prompt_hash"] == prompt_hash(r["prompt"], None)
        assert r["teacher"] == f"{server.url}#tiny"
        assert r["sampling"]["temperature"] == 1.0 and r["sampling"]["max_new_tokens"] == 12
        assert r["completion_tokens"] >= 1 and r["prompt_tokens"] == len(r["prompt"])
        assert r["answer"] == str(r["index"] % 7)
    seeds = [q["body"]["seed"] for q in server.requests]
    assert sorted(seeds) == sorted(r["sampling"]["seed"] for r in rows) and len(set(seeds)) == 10
    budget = json.loads((tmp_path / "out" / "budget.json").read_text())["phases"]["teacher_generation"]
    assert budget["tokens"] == sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)
    assert budget["seconds"] > 0 and budget["flops"] is None  # a server teacher's size is unknown


@pytest.mark.parametrize("fault", ["429", "500", "503", "drop", "slow"])
def test_server_faults_are_retried(tiny, tmp_path, fault):
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    with ChatServer(*tiny, slow_s=1.5) as server:
        server.faults.extend([fault, fault])
        run_generate(str(prompts), tmp_path / "out", SETTINGS, server=fast(server.url, timeout_s=0.5), progress=False)
        clean = tmp_path / "clean"
        run_generate(str(prompts), clean, SETTINGS, server=fast(server.url), progress=False)
    rows = read_rows(tmp_path / "out" / "generations.jsonl")
    assert len(rows) == 6 and sum(r["retries"] for r in rows) == 2
    # The retried rows are the rows an undisturbed run writes.
    ref = {r["key"]: r["completion"] for r in read_rows(clean / "generations.jsonl")}
    assert {r["key"]: r["completion"] for r in rows} == ref
    budget = json.loads((tmp_path / "out" / "budget.json").read_text())["phases"]["teacher_generation"]
    assert budget["retries"] == 2


def test_retry_after_is_waited_and_a_refused_prompt_is_an_error_row(tiny, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    one = GenerateSettings(max_new_tokens=4)
    with ChatServer(*tiny) as server:
        server.faults.extend(["429w"])
        t0 = time.perf_counter()
        run_generate(str(prompts), tmp_path / "a", one, server=fast(server.url, concurrency=1, max_backoff_s=1.0), progress=False)
        assert time.perf_counter() - t0 >= 0.4  # the server's Retry-After, not the 0.01 s backoff
        server.faults.extend(["400"])
        run_generate(str(prompts), tmp_path / "b", one, server=fast(server.url, concurrency=1), progress=False)
    rows = sorted(read_rows(tmp_path / "b" / "generations.jsonl"), key=lambda r: r["index"])
    assert rows[0]["finish_reason"] == "error" and rows[0]["error"] == 'HTTP 400 {"error": {"message": "prompt too long"}}'
    assert rows[1]["finish_reason"] in ("stop", "length") and "error" not in rows[1]


def test_server_gives_up_with_one_line(tiny, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 1)
    with ChatServer(*tiny) as server:
        server.faults.extend(["500"] * 10)
        with pytest.raises(DistillError, match=r"prompt 1 sample [01]: gave up after 3 attempts; last: HTTP 500") as e:
            run_generate(str(prompts), tmp_path / "out", SETTINGS, server=fast(server.url, max_retries=2), progress=False)
    assert "\n" not in str(e.value) and server.url in str(e.value)


def test_unauthorized_stops_at_once_and_names_the_variable(tiny, tmp_path, monkeypatch):
    prompts = write_prompts(tmp_path / "p.jsonl", 1)
    monkeypatch.setenv("TEACHER_KEY", "wrong-secret-123")
    with ChatServer(*tiny, api_key="right") as server:
        with pytest.raises(DistillError, match=r"HTTP 401 \(check the key in \$TEACHER_KEY\)") as e:
            one = GenerateSettings(max_new_tokens=4)
            run_generate(str(prompts), tmp_path / "out", one, server=fast(server.url, api_key_env="TEACHER_KEY"), progress=False)
        assert len(server.requests) == 1  # not retried
    assert "wrong-secret-123" not in str(e.value)


def test_concurrency_limit_is_kept(tiny, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 12)
    with ChatServer(*tiny, delay_s=0.1) as server:
        run_generate(str(prompts), tmp_path / "out", GenerateSettings(max_new_tokens=4), server=fast(server.url), progress=False)
    assert server.max_in_flight == 3


def cli(*args: str, env: dict | None = None) -> list[str]:
    return [sys.executable, "-m", "distill", "generate", *args]


def run_and_kill(cmd: list[str], output: Path, after_rows: int, env: dict) -> None:
    """Start `cmd`, SIGKILL it once `output` holds `after_rows` lines."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if output.exists() and output.read_bytes().count(b"\n") >= after_rows:
            break
        if proc.poll() is not None:
            raise AssertionError(f"finished before the kill: {proc.stderr.read().decode()[-500:]}")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["server", "local"])
def test_kill_9_then_rerun_loses_and_repeats_nothing(tiny, teacher_dir, tmp_path, backend):
    prompts = write_prompts(tmp_path / "p.jsonl", 40)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "SECRET_KEY_VAR": "sk-never-written-42"}
    common = ["--prompts", str(prompts), "--samples", "2", "--temperature", "1", "--max-new-tokens", "10", "--seed", "5"]
    with ChatServer(*tiny, api_key="sk-never-written-42", delay_s=0.02) as server:
        if backend == "server":
            common += ["--server", server.url, "--model", "tiny", "--concurrency", "2", "--api-key-env", "SECRET_KEY_VAR"]
        else:
            common += ["--teacher", str(teacher_dir), "--batch-size", "2"]
        out, ref = tmp_path / "out", tmp_path / "ref"
        run_and_kill(cli(*common, "--out", str(out)), out / "generations.jsonl", 6, env)
        killed_at = len(read_rows_tolerant(out / "generations.jsonl"))
        # A kill can cut a line in half; make sure this run sees one.
        with open(out / "generations.jsonl", "a") as f:
            f.write('{"key": "half-writ')
        done = subprocess.run(cli(*common, "--out", str(out)), env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "dropped a half-written last line" in done.stderr
        subprocess.run(cli(*common, "--out", str(ref)), env=env, capture_output=True, check=True)
    rows = read_rows(out / "generations.jsonl")  # every line is whole JSON
    assert 6 <= killed_at < 80
    assert len(rows) == 80 and len({r["key"] for r in rows}) == 80
    assert {r["key"]: r["completion"] for r in rows} == {r["key"]: r["completion"] for r in read_rows(ref / "generations.jsonl")}
    assert json.loads(done.stdout)["already_there"] == killed_at
    if backend == "server":
        assert all(q["headers"].get("Authorization") == "Bearer sk-never-written-42" for q in server.requests)
        for path in out.iterdir():
            assert "sk-never-written-42" not in path.read_text()
        assert "sk-never-written-42" not in done.stdout + done.stderr


def read_rows_tolerant(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]]


def test_local_rows_do_not_depend_on_batch_size(teacher_dir, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 6)
    for b in (1, 4):
        run_generate(str(prompts), tmp_path / f"b{b}", SETTINGS, teacher=str(teacher_dir), batch_size=b, progress=False)
    one, four = (read_rows(tmp_path / f"b{b}" / "generations.jsonl") for b in (1, 4))
    assert {r["key"]: r["completion"] for r in one} == {r["key"]: r["completion"] for r in four}
    assert len({r["completion"] for r in one}) > 1
    budget = json.loads((tmp_path / "b1" / "budget.json").read_text())["phases"]["teacher_generation"]
    tokens = sum(r["prompt_tokens"] + r["completion_tokens"] for r in one)
    assert budget["tokens"] == tokens and budget["flops"] == 2 * budget["teacher_params"] * tokens


def test_local_greedy_equals_transformers_generate(tiny, teacher_dir, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 4)
    greedy = GenerateSettings(temperature=0.0, max_new_tokens=10)
    run_generate(str(prompts), tmp_path / "out", greedy, teacher=str(teacher_dir), batch_size=3, progress=False)
    rows = sorted(read_rows(tmp_path / "out" / "generations.jsonl"), key=lambda r: r["index"])
    model, tok = tiny
    assert [r["completion"] for r in rows] == generate_greedy(model, tok, [r["prompt"] for r in rows], 10, 4)


def test_rerun_with_other_settings_is_refused(teacher_dir, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    run_generate(str(prompts), tmp_path / "out", SETTINGS, teacher=str(teacher_dir), progress=False)
    before = (tmp_path / "out" / "generations.jsonl").read_bytes()
    other = GenerateSettings(temperature=0.5, max_new_tokens=12, samples=2, seed=3)
    with pytest.raises(ConfigError, match=r"generate.json: this output was written with sampling="):
        run_generate(str(prompts), tmp_path / "out", other, teacher=str(teacher_dir), progress=False)
    assert (tmp_path / "out" / "generations.jsonl").read_bytes() == before


def test_line_separators_inside_a_row_survive_a_resume(tmp_path):
    rows = RowFile(tmp_path / "g.jsonl")
    rows.append({"key": "a", "completion": "line\u2028break\u0085and more"})
    rows.close()
    again = RowFile(tmp_path / "g.jsonl")
    again.close()
    assert again.keys == {"a"} and again.rows[0]["completion"] == "line\u2028break\u0085and more"


def test_a_failed_start_can_be_corrected(teacher_dir, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    with pytest.raises(DistillError, match="model path not found"):
        run_generate(str(prompts), tmp_path / "out", SETTINGS, teacher=str(tmp_path / "typo"), progress=False)
    run_generate(str(prompts), tmp_path / "out", SETTINGS, teacher=str(teacher_dir), progress=False)
    assert len(read_rows(tmp_path / "out" / "generations.jsonl")) == 4


def test_bad_inputs_name_the_place(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    with pytest.raises(DistillError, match=r"p.jsonl:2: a row needs a non-empty string 'prompt'"):
        run_generate(str(bad), tmp_path / "out", SETTINGS, teacher="unused", progress=False)
    with pytest.raises(ConfigError, match="exactly one teacher"):
        run_generate(str(bad), tmp_path / "out", SETTINGS, progress=False)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"key": "a"}\nnot json\n')
    with pytest.raises(DistillError, match=r"rows.jsonl:2: not a generation row"):
        RowFile(rows)


def test_builtin_prompts_carry_gold_answers(teacher_dir, tmp_path):
    greedy = GenerateSettings(temperature=0.0, max_new_tokens=4)
    summary = run_generate("builtin:chain", tmp_path / "out", greedy, teacher=str(teacher_dir), n=3, progress=False)
    rows = sorted(read_rows(tmp_path / "out" / "generations.jsonl"), key=lambda r: r["index"])
    gold = builtin_rows("train", 3, 0, 3, 6)
    assert summary["rows"] == 3 and [(r["prompt"], r["answer"]) for r in rows] == [(g.prompt, g.answer) for g in gold]
    with pytest.raises(ConfigError, match="needs --n"):
        run_generate("builtin:chain", tmp_path / "o2", greedy, teacher=str(teacher_dir), progress=False)


def test_server_generation_from_inside_a_running_event_loop(tiny, tmp_path):
    """As in a notebook: run_generate called while this thread's event loop runs (on a
    thread of its own, since a Playwright session may hold the main thread's loop)."""
    prompts = write_prompts(tmp_path / "p.jsonl", 2)

    async def inside():
        with ChatServer(*tiny) as server:
            return run_generate(str(prompts), tmp_path / "out", SETTINGS, server=fast(server.url), progress=False)

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(asyncio.run, inside()).result()["rows"] == 4
