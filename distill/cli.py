"""The `distill` command line. User errors print one line and exit non-zero, no traceback."""

import errno
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer

from distill import rundir
from distill.errors import ConfigError, DistillError, printable

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Knowledge distillation of language models. A failure prints one line; add --debug anywhere for its traceback.",
)


@app.command()
def train(
    config: Annotated[str | None, typer.Argument(help="Run config YAML.")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="Dotted overrides: train.steps=300")] = None,
    resume: Annotated[str | None, typer.Option(help="Continue the run in this directory.")] = None,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the held-out evaluation.")] = False,
):
    """Train a student (logit KD, or labels only with objective.alpha=0)."""
    from distill.config import load_config
    from distill.pipeline.runner import run_training

    if resume is not None:
        # `distill train --resume RUN_DIR [overrides]`: the run's own resolved config.
        if config is not None:
            overrides = [config, *(overrides or [])]
        cfg = load_config(Path(resume) / rundir.CONFIG, overrides or [])
        if Path(cfg.out_dir).resolve() != Path(resume).resolve():
            cfg.out_dir = str(resume)
    elif config is None:
        raise ConfigError("give a run config YAML, or --resume RUN_DIR")
    else:
        cfg = load_config(config, overrides or [])
    try:
        result = run_training(cfg, resume=resume is not None, evaluate=not no_eval)
    finally:
        end_process_group()
    typer.echo(json.dumps(result, indent=2))


def end_process_group() -> None:
    """Under torchrun: take the process group down before the process exits (left to
    interpreter exit, a gloo process sometimes aborted there after a finished run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@app.command("eval")
def evaluate(
    path: Annotated[str, typer.Argument(help="A run directory or a save_pretrained model folder.")],
    config: Annotated[str | None, typer.Option(help="Run config for the data (default: the run's own).")] = None,
    gates: Annotated[bool, typer.Option("--gates", help="Check the config's release gates: table on stderr, exit 3 on a failure.")] = False,
    scheme: Annotated[str | None, typer.Option(help="Evaluate the run's quantized student RUN/student-SCHEME/ (int8, int4).")] = None,
):
    """Evaluate a student on the held-out split (against its teacher when the run has one); write eval.json."""
    from rich.console import Console

    from distill.eval.gates import GateFailure, gates_table
    from distill.pipeline.runner import run_eval

    result = run_eval(path, config, gates=gates, scheme=scheme)
    typer.echo(json.dumps(result, indent=2))
    if gates:
        report = result["gates"]
        Console(stderr=True).print(gates_table(report))
        failed = [r["metric"] for r in report["results"] if not r["passed"]]
        if failed:
            raise GateFailure(f"{len(failed)} of {len(report['results'])} release gates failed: {', '.join(failed)}")


@app.command()
def quantize(
    path: Annotated[str, typer.Argument(help="A run directory (its student/), a model folder, .gguf or packaged alias.")],
    scheme: Annotated[str, typer.Option(help="int8 (weight-only, per row) or int4 (weight-only, per group).")],
    group_size: Annotated[int | None, typer.Option(help="int4: weights per scale (default: the run's quant.group_size, else 32).")] = None,
    activations: Annotated[bool | None, typer.Option("--activations/--no-activations", help="Also quantize layer inputs to int8 per token.")] = None,
    out: Annotated[str | None, typer.Option(help="Output folder (default RUN/student-SCHEME, or FOLDER-SCHEME beside a model folder).")] = None,
):
    """Post-training quantization (torchao): a folder that loads back with load_causal_lm, and quant.json with its size."""
    from distill.pipeline.quantize import run_quantize

    record = run_quantize(path, scheme, group_size, activations, out)
    shown = {k: v for k, v in record.items() if k != "modules"}  # the layer names are in OUT/quant.json
    typer.echo(json.dumps({**shown, "quantized_layers": len(record["modules"])}, indent=2))


@app.command()
def cache(
    config: Annotated[str, typer.Argument(help="Run config YAML (its teacher, data and objective.temperature).")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Dotted overrides: data.n_train=5000")] = None,
    out: Annotated[str, typer.Option(help="Cache directory (rerun the same command to resume).")] = "teacher-cache",
    top_k: Annotated[int, typer.Option(help="Teacher ids kept per token.")] = 32,
    dtype: Annotated[str, typer.Option(help="Stored log-prob dtype: float16 or float32.")] = "float16",
    shard_examples: Annotated[int, typer.Option(help="Examples per shard file.")] = 1024,
    batch_size: Annotated[int, typer.Option(help="Examples per teacher forward pass.")] = 16,
    server: Annotated[str | None, typer.Option(help="A served teacher: vLLM's OpenAI-compatible server, e.g. http://localhost:8000/v1.")] = None,
    model: Annotated[str | None, typer.Option(help="The server's model name (with --server).")] = None,
    concurrency: Annotated[int, typer.Option(help="Server: requests in flight at once.")] = 8,
    timeout: Annotated[float, typer.Option(help="Server: seconds per request before it is retried.")] = 120.0,
    max_retries: Annotated[int, typer.Option(help="Server: retries on 429, 5xx, dropped connections, timeouts.")] = 6,
    api_key_env: Annotated[str, typer.Option(help="Server: environment variable holding the API key.")] = "OPENAI_API_KEY",
    teacher_params: Annotated[int | None, typer.Option(help="Server: the teacher's parameter count, for the FLOPs estimate.")] = None,
):
    """Run the teacher once over the training data; store its top-k per token for `teacher_cache=`."""
    from distill.config import load_config
    from distill.pipeline.cache import write_teacher_cache

    remote = _server_settings(server, model, api_key_env, concurrency, timeout, max_retries)
    cfg = load_config(config, overrides or [])
    manifest = write_teacher_cache(cfg, out, top_k, dtype, shard_examples, batch_size, server=remote, teacher_params=teacher_params)
    tokens = sum(s["tokens"] for s in manifest["shards"])
    size = sum(s["bytes"] for s in manifest["shards"])
    summary = {"out": out, "examples": manifest["n_examples"], "tokens": tokens, "bytes": size}
    summary["bytes_per_token"] = size / max(tokens, 1)
    typer.echo(json.dumps(summary, indent=2))


def _server_settings(server: str | None, model: str | None, api_key_env: str, concurrency: int, timeout: float, retries: int):
    """The --server options of `generate` and `cache`, checked; None without --server."""
    from distill.pipeline.chat_client import ServerSettings

    if server is None:
        return None
    if model is None:
        raise ConfigError("--server needs --model (the name the server knows the teacher by)")
    if concurrency < 1 or timeout <= 0 or retries < 0:
        raise ConfigError("--concurrency must be >= 1, --timeout > 0 and --max-retries >= 0")
    return ServerSettings(server, model, api_key_env, concurrency, timeout, retries)


@app.command()
def generate(
    prompts: Annotated[str, typer.Option(help="Prompts: a JSONL file of {prompt, answer?} or chat {messages, answer?} rows, an hf: source, or builtin:chain.")],
    out: Annotated[str, typer.Option(help="Output folder (generations.jsonl); rerun the same command to resume.")],
    teacher: Annotated[str | None, typer.Option(help="Local teacher: hub id, folder, run dir, .gguf or packaged alias.")] = None,
    server: Annotated[str | None, typer.Option(help="OpenAI-compatible server, e.g. http://localhost:8000/v1.")] = None,
    model: Annotated[str | None, typer.Option(help="The server's model name (with --server).")] = None,
    n: Annotated[int | None, typer.Option(help="Use the first N prompts (required for builtin:chain).")] = None,
    samples: Annotated[int, typer.Option(help="Samples per prompt (for self-consistency).")] = 1,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0: greedy).")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Top-k filter (0: off).")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per completion.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the per-row sampling seeds.")] = 0,
    system: Annotated[str | None, typer.Option(help="System message (default: the chat template's).")] = None,
    chat_template: Annotated[bool | None, typer.Option("--chat-template/--no-chat-template", help="Local teacher: wrap prompts in its chat template (default: when it has one).")] = None,
    batch_size: Annotated[int, typer.Option(help="Local teacher: rows sampled at once.")] = 16,
    dtype: Annotated[str, typer.Option(help="Local teacher weights: float32 or bfloat16.")] = "float32",
    concurrency: Annotated[int, typer.Option(help="Server: requests in flight at once.")] = 8,
    timeout: Annotated[float, typer.Option(help="Server: seconds per request before it is retried.")] = 120.0,
    max_retries: Annotated[int, typer.Option(help="Server: retries on 429, 5xx, dropped connections, timeouts.")] = 6,
    api_key_env: Annotated[str, typer.Option(help="Server: environment variable holding the API key.")] = "OPENAI_API_KEY",
    teacher_params: Annotated[int | None, typer.Option(help="Server: the teacher's parameter count, for the FLOPs estimate.")] = None,
    split: Annotated[str | None, typer.Option(help="hf: prompts: the split (default: train).")] = None,
    columns: Annotated[str | None, typer.Option(help="hf: prompts: field=column pairs, e.g. prompt=question,answer=final.")] = None,
):
    """A teacher writes rationale + answer for each prompt (local model or server)."""
    from distill.pipeline.generate import GenerateSettings, run_generate

    settings = GenerateSettings(temperature, top_p, top_k, max_new_tokens, samples, seed, system)
    remote = _server_settings(server, model, api_key_env, concurrency, timeout, max_retries)
    mapping = None
    if columns is not None:
        pairs = [p.split("=", 1) for p in columns.split(",") if p.strip()]
        if not pairs or any(len(p) != 2 or p[0].strip() not in ("prompt", "answer") or not p[1].strip() for p in pairs):
            raise ConfigError(f"--columns {columns!r}: give field=column pairs for prompt and answer, e.g. prompt=question,answer=final")
        mapping = {f.strip(): c.strip() for f, c in pairs}
    summary = run_generate(prompts, Path(out), settings, teacher, remote, n, batch_size, chat_template, dtype, teacher_params,
                           split=split, columns=mapping)  # fmt: skip
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def teachers(
    config: Annotated[str | None, typer.Argument(help="Run config YAML: its rows are scored (omit with --example).")] = None,
    rest: Annotated[list[str] | None, typer.Argument(help="More candidates after --candidates, and dotted overrides key=value.")] = None,
    candidates: Annotated[list[str] | None, typer.Option(help="Candidate teachers: hub id, folder, run dir, .gguf, packaged: alias, or URL#MODEL of a chat server.")] = None,
    example: Annotated[str | None, typer.Option(help="Score on a packaged example instead of a config: chat or prose.")] = None,
    out: Annotated[str | None, typer.Option(help="Folder for teachers.json (default: the config's out_dir).")] = None,
    rows: Annotated[int, typer.Option(help="Rows scored (held-out split first).")] = 32,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens of a greedy answer.")] = 64,
    batch_size: Annotated[int, typer.Option(help="Rows per forward pass and per generation batch.")] = 8,
    agreement_words: Annotated[int, typer.Option(help="Rows without gold answers: answers agree when their first N words match.")] = 8,
    dtype: Annotated[str, typer.Option(help="Local candidates' weights: float32 or bfloat16.")] = "float32",
    api_key_env: Annotated[str, typer.Option(help="Served candidates: environment variable holding the API key.")] = "OPENAI_API_KEY",
    concurrency: Annotated[int, typer.Option(help="Served candidates: requests in flight at once.")] = 4,
    timeout: Annotated[float, typer.Option(help="Served candidates: seconds per request before it is retried.")] = 120.0,
):
    """Score candidate teachers on the run's rows before training: accuracy, CE, bits/byte, agreement, length, refusals, cost."""
    from distill.pipeline.teachers import TeacherSettings, teachers_command

    # `--candidates A B C`: click binds A to the option and B, C to the positional arguments;
    # a positional argument without '=' is a candidate, one with '=' an override.
    positional = ([config] if config is not None else []) + list(rest or [])
    config = None
    if example is None and positional:
        config = next((p for p in positional if p.endswith((".yaml", ".yml"))), positional[0])
        positional.remove(config)
    names = list(candidates or []) + [p for p in positional if "=" not in p]
    overrides = [p for p in positional if "=" in p]
    settings = TeacherSettings(rows, max_new_tokens, batch_size, agreement_words, dtype, api_key_env, concurrency, timeout)
    teachers_command(config, overrides, example, names, out, settings)


@app.command()
def curate(
    generations: Annotated[str, typer.Argument(help="A `distill generate` folder or its generations.jsonl.")],
    out: Annotated[str | None, typer.Option(help="Curated rows (default: curated.jsonl beside the generations).")] = None,
    answer_format: Annotated[str, typer.Option(help="auto, gsm8k, boxed, answer_line, chain, or regex:PATTERN.")] = "auto",
    min_chars: Annotated[int, typer.Option(help="Shortest rationale kept (characters).")] = 1,
    max_chars: Annotated[int | None, typer.Option(help="Longest rationale kept (characters).")] = None,
    keep_truncated: Annotated[bool, typer.Option(help="Keep rows that hit max_new_tokens.")] = False,
    check_gold: Annotated[bool, typer.Option("--check-gold/--no-check-gold", help="Reject answers that differ from the gold answer.")] = True,
    check_consistency: Annotated[bool, typer.Option("--check-consistency/--no-check-consistency", help="Reject rationales whose conclusion differs from the answer.")] = True,
    self_consistency: Annotated[bool, typer.Option("--self-consistency/--no-self-consistency", help="With several samples, keep only the majority answer.")] = True,
    min_agreement: Annotated[float, typer.Option(help="Drop prompts whose majority has under this share of samples.")] = 0.0,
    near_dup: Annotated[float, typer.Option(help="MinHash Jaccard threshold of near-duplicates (0: off).")] = 0.9,
    per_prompt: Annotated[int, typer.Option(help="Most rows kept per prompt.")] = 1,
):
    """Filter teacher generations: duplicates, lengths, answers, consistency, majority vote."""
    from rich.console import Console
    from rich.table import Table

    from distill.pipeline.curate import CurateSettings, write_curated

    source = Path(generations)
    target = Path(out) if out else (source if source.is_dir() else source.parent) / "curated.jsonl"
    settings = CurateSettings(
        answer_format, min_chars, max_chars, keep_truncated, check_consistency, check_gold, self_consistency,
        min_agreement, near_dup or None, per_prompt=per_prompt,
    )
    summary = write_curated(source, target, settings)
    table = Table(title=f"curation of {summary['rows']} rows ({summary['prompts']} prompts)")
    table.add_column("rows")
    table.add_column("count", justify="right")
    table.add_row("kept", str(summary["kept"]))
    for reason, count in summary["rejected_by_reason"].items():
        table.add_row(f"rejected: {reason}", str(count))
    Console(stderr=True).print(table)
    typer.echo(json.dumps({"out": str(target), **{k: v for k, v in summary.items() if k != "settings"}}, indent=2))


@app.command()
def report(
    runs: Annotated[list[str], typer.Argument(help="Run directories, shown side by side.")],
    out: Annotated[str, typer.Option(help="The HTML file to write.")] = "report.html",
):
    """One self-contained HTML report of runs: losses, eval metrics, reliability, gates, budget."""
    from distill.report import write_report

    typer.echo(str(write_report([Path(r) for r in runs], Path(out))))


@app.command()
def latents(
    runs: Annotated[list[str] | None, typer.Argument(help="Run directories with latents/ (a teacher model and features.probe_examples > 0).")] = None,
    out: Annotated[str, typer.Option(help="The HTML file to write.")] = "latents.html",
    simulate: Annotated[bool, typer.Option("--simulate", help="Draw the toy simulation instead of runs (no model needed).")] = False,
    pair: Annotated[int | None, typer.Option(help="Layer pair to draw (index into the probe's pairs; default the last).")] = None,
):
    """An interactive page of the students' states in the teacher's latent space, over checkpoints."""
    from distill.report.latents import write_latent_page

    if not simulate and not runs:
        raise DistillError("give run directories, or --simulate for the toy version")
    typer.echo(str(write_latent_page([Path(r) for r in runs or []], Path(out), simulate=simulate, pair=pair)))


@app.command()
def student(
    teacher: Annotated[str, typer.Option("--from", help="Teacher: hub id, folder, .gguf or packaged alias.")],
    out: Annotated[str, typer.Option(help="Folder to write the student to (must not exist).")],
    layers: Annotated[int | None, typer.Option(help="Keep this many teacher layers: spread evenly, or by importance.")] = None,
    every: Annotated[int | None, typer.Option(help="Keep teacher layers 0, k, 2k, ...")] = None,
    keep: Annotated[str | None, typer.Option(help="Keep these teacher layers: '0,4,8,12'.")] = None,
    hidden_size: Annotated[int | None, typer.Option(help="Narrower hidden size (random init, or cut with --prune).")] = None,
    intermediate_size: Annotated[int | None, typer.Option(help="Narrower MLP size (random init, or cut with --prune).")] = None,
    heads: Annotated[int | None, typer.Option(help="Attention heads (random init, or cut with --prune).")] = None,
    kv_heads: Annotated[int | None, typer.Option(help="Key-value heads (random init, or cut with --prune).")] = None,
    config: Annotated[str | None, typer.Option(help="A transformers config JSON (another family; random init).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of a random init.")] = 0,
    prune: Annotated[bool, typer.Option("--prune", help="Cut the student from the teacher by measured importance.")] = False,
    params: Annotated[str | None, typer.Option(help="--prune to this many parameters, e.g. 60M.")] = None,
    calibration: Annotated[str | None, typer.Option(help="--prune: JSONL rows or an hf: source to measure on (default: built-in).")] = None,
    calibration_rows: Annotated[int | None, typer.Option(help="--prune: calibration rows (default 256).")] = None,
):
    """Make a smaller student from a teacher: layer drop, narrower, another family, or pruned by importance."""
    from distill.models.students import make_student

    if prune:
        from distill.models.pruning import make_pruned_student

        if every is not None or keep is not None or config is not None:
            raise DistillError("--prune chooses the layers by importance: give --layers N, not --every, --keep or --config")
        record = make_pruned_student(
            teacher, out, layers, hidden_size, intermediate_size, heads, kv_heads, params, calibration, calibration_rows
        )
        typer.echo(json.dumps(record, indent=2))
        return
    if params is not None or calibration is not None or calibration_rows is not None:
        raise DistillError("--params, --calibration and --calibration-rows go with --prune")
    kept = None
    if keep is not None:
        try:
            kept = [int(x) for x in keep.split(",") if x.strip()]
        except ValueError:
            raise DistillError(f"--keep {keep!r}: give comma-separated layer numbers, e.g. 0,4,8") from None
    record = make_student(teacher, out, layers, every, kept, hidden_size, intermediate_size, heads, kv_heads, config, seed)
    typer.echo(json.dumps(record, indent=2))


@app.command()
def export(
    source: Annotated[str, typer.Argument(help="A run directory (its student/) or a save_pretrained model folder.")],
    gguf: Annotated[str | None, typer.Option("--gguf", help="Write one GGUF file for llama.cpp: f16 or q8_0.")] = None,
    out: Annotated[str | None, typer.Option(help="The file (default RUN/student-<scheme>.gguf, or <folder>-<scheme>.gguf).")] = None,
):
    """Export a student for serving: one GGUF file (weights, metadata, tokenizer) for llama.cpp."""
    if gguf is None:
        raise DistillError("say the format: --gguf f16 or --gguf q8_0")
    from distill.pipeline.gguf_export import export_gguf

    typer.echo(json.dumps(export_gguf(source, gguf, out), indent=2))


@app.command()
def demo(
    out: Annotated[str | None, typer.Option(help="Where the runs go (default distill-demo, or distill-demo-real).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the students' training.")] = 0,
    task: Annotated[str | None, typer.Option(help="grammar (KL to the true distribution; default) or chain (accuracy).")] = None,
    real: Annotated[bool, typer.Option("--real", help="SmolLM2-135M-Instruct and its 10-layer student.")] = False,
    steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps per student (--real only; default 100).")] = None,
):
    """Offline end-to-end demo: teacher, logit-KD student, label-only student, a table, the gain and report.html."""
    if real:
        if task is not None:
            raise ConfigError("--real trains on its own text (CPython prose); drop --task")
        from distill.pipeline.demo_real import RealDemo, run_real_demo

        settings = RealDemo() if steps is None else RealDemo(steps=steps)
        run_real_demo(Path(out or "distill-demo-real"), seed=seed, settings=settings)
        return
    if steps is not None:
        raise ConfigError("--steps sets the students' steps of --real only; the other demos use their packaged configs")
    from distill.pipeline.demo import run_demo

    run_demo(Path(out or "distill-demo"), seed=seed, task_name=task or "grammar")


DEBUG_FLAG = "--debug"  # anywhere on the command line: a failure also prints its traceback


def _fail(message: str, code: int, debug: bool) -> None:
    """One line on stderr (control characters and escape sequences made harmless), then exit;
    with --debug the traceback first."""
    if debug:
        traceback.print_exc()
    print(f"error: {printable(message)}", file=sys.stderr)
    sys.exit(code)


def _os_error(e: OSError) -> str:
    """An OSError the user's machine caused (read-only folder, full disk) in one line."""
    where = f"{e.filename}: " if e.filename else ""
    why = e.strerror or type(e).__name__
    hint = " (free some space, then resume: train --resume, or rerun generate / cache)" if e.errno == errno.ENOSPC else ""
    return f"{where}{why}{hint}"


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress display is enough
    # torchao (the quant extra; transformers imports it too) logs a warning per CUDA kernel it
    # cannot load on a CPU machine, and torch one per enum torchao registers: noise, not news.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    debug = DEBUG_FLAG in sys.argv[1:]
    if debug:
        sys.argv = [a for a in sys.argv if a != DEBUG_FLAG]
    try:
        code = app(standalone_mode=False)
    except DistillError as e:
        _fail(str(e), e.exit_code, debug)
    except (typer.Abort, KeyboardInterrupt):
        if debug:
            traceback.print_exc()
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # a read-only out_dir, a full disk, a vanished file
        _fail(_os_error(e), 1, debug)
    except MemoryError:
        _fail("out of memory (a batch size, row length or model too large for this machine?)", 1, debug)
    except Exception as e:  # usage errors (unknown option, missing argument) arrive here
        # They are click's ClickException, or the same class from the click that newer typer
        # vendors (typer._click): recognised by what they offer, not by their module.
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            if isinstance(getattr(e, "message", None), str):
                e.message = printable(e.message)  # it quotes the user's arguments
            e.show()
            sys.exit(e.exit_code)
        raise
    if code == 130:  # in standalone_mode=False typer turns Ctrl-C into this return value
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
