"""Where distill keeps things on disk, how it writes them safely, and how it reads what it
did not write (configs, data, manifests) without letting a hostile file exhaust memory.

Writes: every file is written beside its final name, flushed to disk (fsync), given the
mode the umask allows (safetensors alone would write 0600) and renamed into place; a
folder appears whole or not at all (`atomic_folder`). Reads: JSON and YAML are bounded in
size, nesting and (YAML) alias expansion; text must be UTF-8; every failure is one
DistillError line naming the file (and line).
"""

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

MAX_JSON_BYTES = 256 << 20  # a manifest, budget or eval file; anything larger is not ours
MAX_JSONL_LINE_BYTES = 64 << 20  # one data row
MAX_YAML_BYTES = 4 << 20  # a run config
MAX_YAML_VALUES = 100_000  # values of a YAML document once its aliases are expanded
MAX_YAML_DEPTH = 100  # nesting of a YAML document


def cache_root() -> Path:
    """The cache folder: $DISTILL_CACHE, else ~/.cache/distill."""
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode open() gives a new file: 0666 less the umask."""
    return 0o666 & ~_umask()


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk. A folder on a file system that
    cannot sync folders (EINVAL) is left as it is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if not Path(path).is_dir() or e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def finish_file(path: Path) -> None:
    """Give a written file the umask's mode and flush it to disk (before it is renamed)."""
    os.chmod(path, file_mode())
    fsync_path(path)


def _atomic_write(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes 0600; give what open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)  # the rename itself


def atomic_write_text(path: Path, text: str) -> None:
    """Write text to a temp file beside `path`, fsync, then rename: readers (and a reader
    after a power cut) see the old file or the new one, never half of one."""
    _atomic_write(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`atomic_write_text` for bytes."""
    _atomic_write(path, data)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def parse_json(text: str | bytes, where: str, what: str):
    """json.loads, with a malformed or absurdly nested document a DistillError naming `where`."""
    from distill.errors import DistillError

    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DistillError(f"{where}:{e.lineno}: {what} is not valid JSON ({e.msg})") from None
    except RecursionError:
        raise DistillError(f"{where}: {what} is nested too deeply to be read") from None


def read_json(path: Path, what: str, max_bytes: int = MAX_JSON_BYTES):
    """Parse a JSON file; a missing, oversized, non-UTF-8 or malformed one is a DistillError
    naming it (and the line)."""
    from distill.errors import DistillError

    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{what} not found: {path}")
    size = path.stat().st_size
    if size > max_bytes:
        raise DistillError(f"{path}: {what} is {size:,} bytes, more than the {max_bytes:,} it may have")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DistillError(f"{path}: {what} is not UTF-8 text (byte {e.start})") from None
    return parse_json(text, str(path), what)


def jsonl_objects(path: Path, what: str):
    """Yield (where, object) for each non-empty line of a JSONL file, `where` being "file:line".

    A missing file, a line that is not UTF-8, not JSON, not a JSON object, nested too deeply
    or longer than MAX_JSONL_LINE_BYTES is a DistillError naming it. Lines end at "\\n"
    only: a U+2028 inside a string is text, not a line end.
    """
    from distill.errors import DistillError

    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{what} not found: {path}")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if len(raw) > MAX_JSONL_LINE_BYTES:
                raise DistillError(
                    f"{where}: a line of {len(raw):,} bytes, more than the {MAX_JSONL_LINE_BYTES:,} a row may have"
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DistillError(f"{where}: not UTF-8 text (byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DistillError(f"{where}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise DistillError(f"{where}: nested too deeply to be read") from None
            if not isinstance(obj, dict):
                raise DistillError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def load_yaml(text: str, where: str, error: type[Exception] | None = None):
    """yaml.safe_load with bounds: at most MAX_YAML_DEPTH levels of nesting and
    MAX_YAML_VALUES values once aliases are expanded (an alias bomb is refused before it
    expands), no alias that contains itself. A violation raises `error` (DistillError by
    default) naming `where`; malformed YAML raises yaml.YAMLError as usual."""
    import yaml

    from distill.errors import DistillError

    error = error or DistillError

    class Refused(Exception):
        pass

    def expanded(node, depth: int, memo: dict) -> int:
        key = id(node)
        if key in memo:
            if memo[key] is None:
                raise Refused("an alias contains itself")
            return memo[key]
        if depth > MAX_YAML_DEPTH:
            raise Refused(f"nested deeper than {MAX_YAML_DEPTH} levels")
        memo[key] = None
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [x for pair in node.value for x in pair]
        else:
            children = []
        n = 1
        for child in children:
            n += expanded(child, depth + 1, memo)
            if n > MAX_YAML_VALUES:
                raise Refused(f"expands to more than {MAX_YAML_VALUES:,} values (aliases of aliases?)")
        memo[key] = n
        return n

    class Loader(yaml.SafeLoader):
        def compose_document(self):
            node = super().compose_document()
            if node is not None:
                expanded(node, 0, {})
            return node

    try:
        return yaml.load(text, Loader=Loader)  # a SafeLoader: plain data only
    except Refused as e:
        raise error(f"{where}: YAML {e}; refused") from None
    except RecursionError:
        raise error(f"{where}: YAML nested too deeply to be read") from None


def read_text(path: Path, what: str, max_bytes: int, error: type[Exception] | None = None) -> str:
    """A UTF-8 text file of at most `max_bytes`; otherwise `error` (DistillError) naming it."""
    from distill.errors import DistillError

    error = error or DistillError
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise error(f"{path}: {what} is {size:,} bytes, more than the {max_bytes:,} it may have")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise error(f"{path}:{line}: {what} is not UTF-8 text (byte {e.start})") from None


def temp_sibling(final: Path) -> Path:
    """The temp folder beside `final` that `atomic_folder` fills: `.tmp-<name>`."""
    final = Path(final)
    return final.with_name(f".tmp-{final.name}")


def finish_folder(folder: Path) -> None:
    """`finish_file` every file under `folder`, then flush the folders' entries."""
    folder = Path(folder)
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            finish_file(p)
    for d in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        fsync_path(d)
    fsync_path(folder)


def publish_folder(tmp: Path, final: Path) -> None:
    """Replace `final` by the complete folder `tmp` (same parent): a reader sees the old
    folder or the new one, never half of one; its files are on disk before the rename."""
    finish_folder(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_path(Path(final).parent)


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
