"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint folder `checkpoints/step-N/` holds
    model.safetensors, model_1.safetensors ...   the trained modules (student, projectors)
    optimizer.safetensors + optimizer.json        the optimizer's tensors / its param groups
    scheduler.json                                the LR scheduler's counters
    rng-R.safetensors + rng-R.json                process R's torch / numpy / python RNG states
    state.json                                    the step, each file's size and the run's
                                                  budget so far, written last

Nothing here is read with pickle (torch.load, even with weights_only, unpickles): a run
folder handed over by someone else cannot run code on resume. Files of other names (the
`.pkl` / `.bin` of accelerate's save_state in older checkpoints) are never opened. Every
file is flushed to disk before the folder is renamed into place, and so are the run's logs
up to the checkpoint's step. `checkpoint_problem` tells a damaged checkpoint (a file
missing, truncated, of another size than state.json says, or not parsing) from a whole one.
"""

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from distill import rundir
from distill.errors import DistillError
from distill.paths import (
    atomic_folder,
    atomic_write_json,
    atomic_write_text,
    fsync_path,
    publish_folder,
    read_json,
    temp_sibling,
)
from distill.training import sharding

STATE_KEY = re.compile(r"^state\.(\d+)\.(.+)$")


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop keys whose tensor shares storage with an earlier one (tied embeddings):
    safetensors refuses shared tensors, and load_state_dict(strict=False) re-ties them."""
    seen, out = set(), {}
    for key, t in state.items():
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if ptr is not None and ptr in seen:
            continue
        seen.add(ptr)
        out[key] = t.detach().contiguous().cpu()
    return out


def save_modules(acc, modules: list, folder) -> None:
    """Each module's full state dict as model.safetensors, model_1.safetensors, ..."""
    for i, module in enumerate(modules):
        state = sharding.full_state(acc, module)  # every process: a sharded module is gathered
        if acc.is_main_process:
            save_file(_unshared(state), str(folder / module_file(i)))


def module_file(i: int) -> str:
    return "model.safetensors" if i == 0 else f"model_{i}.safetensors"


def load_modules(acc, modules: list, folder) -> None:
    for i, module in enumerate(modules):
        model = acc.unwrap_model(module)
        state = load_file(str(folder / module_file(i)))
        if sharding.is_sharded(model):
            missing, unexpected = sharding.load_full_state(model, state)
            tied = set()
        else:
            missing, unexpected = model.load_state_dict(state, strict=False)
            tied = {k for k, v in model.state_dict().items() if k in missing and _is_tied(model, k)}
        if unexpected or set(missing) - tied:
            raise DistillError(
                f"{folder / module_file(i)}: does not fit the model (missing {sorted(set(missing) - tied)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]})"
            )


def _is_tied(model, key: str) -> bool:
    """True when the parameter `key` shares storage with another entry of the state dict."""
    state = model.state_dict()
    ptr = state[key].untyped_storage().data_ptr()
    return any(k != key and v.untyped_storage().data_ptr() == ptr for k, v in state.items())


def save_optimizer(sd: dict, folder) -> None:
    """An optimizer's state dict (`sharding.optimizer_state`, sharded tensors whole): state ->
    safetensors (`state.<param index>.<name>`); non-tensor state values and param_groups -> JSON."""
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    save_file(tensors, str(folder / "optimizer.safetensors"))
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    atomic_write_json(folder / "optimizer.json", {"param_groups": groups, "scalars": scalars})


def load_optimizer(optimizer, folder) -> None:
    meta = read_json(folder / "optimizer.json", "optimizer state")
    state: dict[int, dict] = {}
    for key, tensor in load_file(str(folder / "optimizer.safetensors")).items():
        m = STATE_KEY.match(key)
        if m is None:
            raise DistillError(f"{folder / 'optimizer.safetensors'}: unexpected tensor {key!r}")
        state.setdefault(int(m.group(1)), {})[m.group(2)] = tensor
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": sharding.shard_optimizer_state(optimizer, state), "param_groups": groups})


def save_scheduler(scheduler, folder) -> None:
    """LambdaLR's counters; its lambdas are code and are rebuilt from the config."""
    sd = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    atomic_write_json(folder / "scheduler.json", sd)


def load_scheduler(scheduler, folder) -> None:
    sd = read_json(folder / "scheduler.json", "scheduler state")
    scheduler.load_state_dict({**sd, "lr_lambdas": [None] * len(scheduler.lr_lambdas)})


def save_rng(folder, rank: int) -> None:
    version, mt, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_keys.astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    save_file(tensors, str(folder / f"rng-{rank}.safetensors"))
    meta = {"python": [version, list(mt), gauss], "numpy": [np_kind, np_pos, np_has_gauss, np_gauss]}
    atomic_write_json(folder / f"rng-{rank}.json", meta)


def load_rng(folder, rank: int) -> None:
    tensors = load_file(str(folder / f"rng-{rank}.safetensors"))
    meta = read_json(folder / f"rng-{rank}.json", "random-number state")
    version, mt, gauss = meta["python"]
    random.setstate((version, tuple(mt), gauss))
    np_kind, np_pos, np_has_gauss, np_gauss = meta["numpy"]
    np.random.set_state((np_kind, tensors["numpy_keys"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_training_state(acc, modules: list, optimizer, scheduler, folder) -> None:
    """Everything a resume needs, into `folder` (which exists)."""
    save_modules(acc, modules, folder)
    optimizer_sd = sharding.optimizer_state(optimizer)  # every process: sharded state is gathered
    if acc.is_main_process:
        save_optimizer(optimizer_sd, folder)
        save_scheduler(scheduler, folder)
    save_rng(folder, acc.process_index)


def load_training_state(acc, modules: list, optimizer, scheduler, folder) -> None:
    """The inverse of `save_training_state`; a checkpoint without these files (one written by
    an older distill with pickled state) is refused, never unpickled, and so is one whose
    tensors do not fit the run (one line, no traceback)."""
    if not (folder / "optimizer.safetensors").is_file() or not (folder / "scheduler.json").is_file():
        raise DistillError(
            f"{folder}: not a checkpoint this version of distill can read safely (no optimizer.safetensors / "
            "scheduler.json); older checkpoints held pickled state, which is never loaded"
        )
    try:
        load_modules(acc, modules, folder)
        load_optimizer(optimizer, folder)
        load_scheduler(scheduler, folder)
        load_rng(folder, acc.process_index)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, SafetensorError) as e:
        text = str(e).strip().splitlines()
        raise DistillError(f"{folder}: does not fit this run ({text[0] if text else type(e).__name__})") from None


def checkpoint_files(folder: Path, n_modules: int, n_processes: int) -> list[str]:
    """The files a resume reads from a checkpoint of `n_modules` trained modules."""
    names = [module_file(i) for i in range(n_modules)] + ["optimizer.safetensors", "optimizer.json", "scheduler.json"]
    for rank in range(n_processes):
        names += [f"rng-{rank}.safetensors", f"rng-{rank}.json"]
    return names


def checkpoint_problem(folder: Path, n_modules: int, n_processes: int) -> str | None:
    """Why the checkpoint in `folder` cannot be resumed from, or None when it is whole: every
    file there, of the size state.json recorded, each safetensors header and JSON file
    parsing. Every process checks every process's files, so all reach the same verdict."""
    try:
        state = read_json(folder / rundir.CHECKPOINT_STATE, "checkpoint state")
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or isinstance(state["step"], bool):
            return f"{rundir.CHECKPOINT_STATE} holds no step"
        sizes = state.get("files") if isinstance(state.get("files"), dict) else {}
        pickled = any(folder.glob("*.pkl")) or any(folder.glob("*.bin"))
        if pickled and not (folder / "optimizer.safetensors").is_file():  # planted beside a whole one: never opened
            return "written by an older distill, with pickled state, which is never loaded"
        for name in checkpoint_files(folder, n_modules, n_processes):
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if name in sizes and path.stat().st_size != sizes[name]:
                return f"{name} is {path.stat().st_size} bytes, {rundir.CHECKPOINT_STATE} says {sizes[name]}"
            if name.endswith(".safetensors"):
                try:
                    with safe_open(str(path), "pt"):
                        pass
                except SafetensorError as e:
                    return f"{name}: {str(e).strip().splitlines()[0] if str(e).strip() else 'unreadable'}"
            else:
                read_json(path, "checkpoint file")
    except (DistillError, OSError) as e:
        text = str(e).strip().splitlines()
        return text[0] if text else type(e).__name__
    return None


def save_checkpoint(
    acc, modules: list, optimizer, scheduler, run_dir: Path, step: int, keep: int, extra: dict | None = None
) -> Path:
    """`save_training_state` into a temp folder, put in place once complete (an interrupted
    save leaves no half checkpoint; its files and the logs up to `step` are on disk first);
    only the newest `keep` checkpoints stay. state.json holds the step, each file's size and
    `extra` (the run's budget so far)."""
    final = rundir.checkpoint_dir(run_dir, step)
    tmp = temp_sibling(final)
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    save_training_state(acc, modules, optimizer, scheduler, tmp)
    acc.wait_for_everyone()
    if acc.is_main_process:
        for log in (rundir.METRICS, rundir.ALIGNMENT):  # the records up to this step survive a power cut too
            if (Path(run_dir) / log).is_file():
                fsync_path(Path(run_dir) / log)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        atomic_write_json(tmp / rundir.CHECKPOINT_STATE, {"step": step, "files": files, **(extra or {})})
        publish_folder(tmp, final)
        for old in rundir.checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    acc.wait_for_everyone()
    return final


def checkpoint_step(folder: Path) -> int:
    return read_json(folder / rundir.CHECKPOINT_STATE, "checkpoint state")["step"]


def checkpoint_state(folder: Path) -> dict:
    """The checkpoint's state.json (step, file sizes, budget)."""
    return read_json(folder / rundir.CHECKPOINT_STATE, "checkpoint state")


def trim_log(path: Path, last_step: int) -> None:
    """On resume, drop records (metrics, alignment) of steps past the checkpoint: they are
    about to be redone. A torn last line (a crash or a full disk while appending) is dropped
    too; a malformed line before it is an error naming the file and line."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    keep = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = record["step"]
            if not isinstance(step, int):
                raise TypeError
        except (ValueError, KeyError, TypeError, RecursionError):
            if all(not rest.strip() for rest in lines[number:]):
                break  # the torn tail of an interrupted append
            raise DistillError(f"{path}:{number}: not a JSON record with a step; the run's log is damaged") from None
        if step <= last_step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def export_student(acc, model, tokenizer, run_dir: Path) -> None:
    """save_pretrained into RUN/student, so plain transformers reloads it."""
    state = sharding.full_state(acc, model)  # every process: a sharded student is gathered
    if acc.is_main_process:
        with atomic_folder(Path(run_dir) / rundir.STUDENT) as tmp:
            plain = acc.unwrap_model(model)
            plain.save_pretrained(tmp, state_dict=state)
            if sharding.is_sharded(plain):  # config.json names the FSDP subclass: the model's own class
                sharding.name_plain_class(tmp / "config.json", plain)
            tokenizer.save_pretrained(tmp)
    acc.wait_for_everyone()
