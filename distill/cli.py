"""The `distill` command line. User errors print one line and exit non-zero, no traceback."""

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from distill.errors import DistillError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Knowledge distillation of language models.")


@app.command()
def train(
    config: Annotated[str | None, typer.Argument(help="Run config YAML.")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="Dotted overrides: train.steps=300")] = None,
    resume: Annotated[str | None, typer.Option(help="Continue the run in this directory.")] = None,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the held-out evaluation.")] = False,
):
    """Train a student (logit KD, or labels only with objective.alpha=0)."""
    from distill.config import load_config
    from distill.errors import ConfigError
    from distill.runner import run_training

    if resume is not None:
        # `distill train --resume RUN_DIR [overrides]`: the run's own resolved config.
        if config is not None:
            overrides = [config, *(overrides or [])]
        cfg = load_config(Path(resume) / "config.yaml", overrides or [])
        if Path(cfg.out_dir).resolve() != Path(resume).resolve():
            cfg.out_dir = str(resume)
    elif config is None:
        raise ConfigError("give a run config YAML, or --resume RUN_DIR")
    else:
        cfg = load_config(config, overrides or [])
    result = run_training(cfg, resume=resume is not None, evaluate=not no_eval)
    typer.echo(json.dumps(result, indent=2))


@app.command("eval")
def evaluate(
    path: Annotated[str, typer.Argument(help="A run directory or a save_pretrained model folder.")],
    config: Annotated[str | None, typer.Option(help="Run config for the data (default: the run's own).")] = None,
):
    """Evaluate a student on the held-out split and write eval.json."""
    from distill.runner import run_eval

    typer.echo(json.dumps(run_eval(path, config), indent=2))


@app.command()
def cache(
    config: Annotated[str, typer.Argument(help="Run config YAML (its teacher, data and objective.temperature).")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Dotted overrides: data.n_train=5000")] = None,
    out: Annotated[str, typer.Option(help="Cache directory (rerun the same command to resume).")] = "teacher-cache",
    top_k: Annotated[int, typer.Option(help="Teacher ids kept per token.")] = 32,
    dtype: Annotated[str, typer.Option(help="Stored log-prob dtype: float16 or float32.")] = "float16",
    shard_examples: Annotated[int, typer.Option(help="Examples per shard file.")] = 1024,
    batch_size: Annotated[int, typer.Option(help="Examples per teacher forward pass.")] = 16,
):
    """Run the teacher once over the training data; store its top-k per token for `teacher_cache=`."""
    from distill.config import load_config
    from distill.teacher_cache import write_teacher_cache

    cfg = load_config(config, overrides or [])
    manifest = write_teacher_cache(cfg, out, top_k, dtype, shard_examples, batch_size)
    tokens = sum(s["tokens"] for s in manifest["shards"])
    size = sum(s["bytes"] for s in manifest["shards"])
    summary = {"out": out, "examples": manifest["n_examples"], "tokens": tokens, "bytes": size}
    summary["bytes_per_token"] = size / max(tokens, 1)
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def student(
    teacher: Annotated[str, typer.Option("--from", help="Teacher: hub id, folder, .gguf or packaged alias.")],
    out: Annotated[str, typer.Option(help="Folder to write the student to (must not exist).")],
    layers: Annotated[int | None, typer.Option(help="Keep this many teacher layers, spread evenly (first and last kept).")] = None,
    every: Annotated[int | None, typer.Option(help="Keep teacher layers 0, k, 2k, ...")] = None,
    keep: Annotated[str | None, typer.Option(help="Keep these teacher layers: '0,4,8,12'.")] = None,
    hidden_size: Annotated[int | None, typer.Option(help="Narrower hidden size (random init).")] = None,
    intermediate_size: Annotated[int | None, typer.Option(help="Narrower MLP size (random init).")] = None,
    heads: Annotated[int | None, typer.Option(help="Attention heads (random init).")] = None,
    kv_heads: Annotated[int | None, typer.Option(help="Key-value heads (random init).")] = None,
    config: Annotated[str | None, typer.Option(help="A transformers config JSON (another family; random init).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of a random init.")] = 0,
):
    """Make a smaller student from a teacher: layer drop, narrower, or another family."""
    from distill.students import make_student

    kept = None
    if keep is not None:
        try:
            kept = [int(x) for x in keep.split(",") if x.strip()]
        except ValueError:
            raise DistillError(f"--keep {keep!r}: give comma-separated layer numbers, e.g. 0,4,8") from None
    record = make_student(teacher, out, layers, every, kept, hidden_size, intermediate_size, heads, kv_heads, config, seed)
    typer.echo(json.dumps(record, indent=2))


@app.command()
def demo(
    out: Annotated[str, typer.Option(help="Where the demo's runs go.")] = "distill-demo",
    seed: Annotated[int, typer.Option(help="Seed of the students' training.")] = 0,
):
    """Offline end-to-end demo: teacher, logit-KD student, label-only student, one table."""
    from distill.demo import run_demo

    run_demo(Path(out), seed=seed)


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress display is enough
    try:
        app(standalone_mode=False)
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # click usage errors arrive here in standalone_mode=False
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
