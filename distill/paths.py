"""Where distill keeps things on disk, and how it writes them safely."""

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """The cache folder: $DISTILL_CACHE, else ~/.cache/distill."""
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write text to a temp file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path, what: str):
    """Parse a JSON file; a missing or malformed one is a DistillError naming it (and the line)."""
    from distill.errors import DistillError

    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DistillError(f"{path}:{e.lineno}: {what} is not valid JSON ({e.msg})") from None


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def jsonl_objects(path: Path, what: str):
    """Yield (where, object) for each non-empty line of a JSONL file, `where` being "file:line".

    A missing file, a line that is not JSON or not a JSON object is a DistillError naming it.
    Lines end at "\\n" only: a U+2028 inside a string is text, not a line end.
    """
    from distill.errors import DistillError

    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{what} not found: {path}")
    for lineno, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DistillError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DistillError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield where, obj


def temp_sibling(final: Path) -> Path:
    """The temp folder beside `final` that `atomic_folder` fills: `.tmp-<name>`."""
    final = Path(final)
    return final.with_name(f".tmp-{final.name}")


def publish_folder(tmp: Path, final: Path) -> None:
    """Replace `final` by the complete folder `tmp` (same parent): a reader sees the old
    folder or the new one, never half of one."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


@contextlib.contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Fill a fresh temp folder beside `final`, then put it in place of `final`.

        with atomic_folder(run_dir / "student") as tmp:
            model.save_pretrained(tmp)

    An exception (or a kill) leaves `final` as it was; the temp folder is removed on an
    exception, and a later call clears one a kill left behind.
    """
    final = Path(final)
    tmp = temp_sibling(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_folder(tmp, final)
