"""Rows from Hugging Face `datasets`: `data.source: hf:PATH` (see `distill.data.sources`).

    hf_objects(source, ...)   (where, row) for each row, with data.columns applied, as
                              `paths.jsonl_objects` yields them for a JSONL file
    hf_rows(source, ...)      training rows (`rows.Row`), checked as JSONL rows are

PATH is a folder written by `save_to_disk` (a Dataset, or a DatasetDict whose split
`split` picks), a parquet / arrow / JSON / JSONL / CSV file, a folder of such files, or,
where the network reaches the hub, a hub dataset name (`subset`: its configuration). Local
paths never touch the network. With `streaming`, only the first `n` rows are read, in the
dataset's own order: the rows a run trains on are fixed and held in memory, so the batch
order stays a function of (seed, step) and resume and multi-process runs stay exact.

`datasets` is imported on first use: reading a config or a JSONL run never loads it.
"""

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

from distill.data.rows import Row, row_from_object
from distill.data.sources import hf_target, local_path
from distill.errors import DistillError

FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}
NEEDED = ("completion", "text", "messages")  # a row needs one of these fields


def datasets_module():
    """The `datasets` package, or a one-line error naming it."""
    try:
        import datasets
    except ImportError:
        raise DistillError(
            "hf: data sources are read with the 'datasets' package, which is not installed: pip install datasets "
            "(or distill[data])"
        ) from None
    return datasets


@contextmanager
def reading(source: str):
    """Whatever `datasets` or pyarrow raise while opening or reading `source` (a missing
    file, a damaged parquet file, an unknown hub name, no network) becomes one line naming it."""
    try:
        yield
    except (DistillError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds (ValueError, ArrowInvalid, DatasetNotFoundError, ...)
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        raise DistillError(f"{source}: cannot read it with datasets ({type(e).__name__}: {lines[0] if lines else e!r})") from None


def is_saved(path) -> bool:
    """Whether `path` is a folder written by `save_to_disk` (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def pick_split(source: str, data, split: str | None, default: str, key: str):
    """The split `split` (None: `default`) of a loaded DatasetDict; a Dataset has none to pick."""
    if hasattr(data, "keys"):  # a DatasetDict
        name = split or default
        if name not in data:
            raise DistillError(f"{source}: no split '{name}' ({key}); its splits: {', '.join(data)}")
        return data[name]
    if split is not None and split != (str(data.split) if data.split is not None else None):
        raise DistillError(f"{source}: a single dataset with no split named '{split}'; leave {key} unset")
    return data


def open_split(source: str, split: str | None, subset: str | None, streaming: bool, default: str, key: str):
    """The rows of one split of `source`: a Dataset or (streaming files or hub) an IterableDataset."""
    ds = datasets_module()
    path = local_path(source)
    if path is None:  # a hub name
        with reading(source):
            return ds.load_dataset(hf_target(source), subset, split=split or default, streaming=streaming)
    if not path.exists():
        raise DistillError(f"{source}: no such file or folder")
    if subset is not None and (is_saved(path) or path.is_file()):
        raise DistillError(f"{source}: data.subset={subset!r} names a configuration, which a local file or save_to_disk folder has not")
    with reading(source):
        if is_saved(path):
            return pick_split(source, ds.load_from_disk(str(path)), split, default, key)
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DistillError(f"{source}: unknown data file type '{path.suffix}' (known: {', '.join(FILE_BUILDERS)})")
            return ds.load_dataset(builder, data_files=str(path), split=split or "train", streaming=streaming)
        return ds.load_dataset(str(path), subset, split=split or default, streaming=streaming)


def mapped(raw: dict, columns: dict[str, str]) -> dict:
    """A dataset row as a distill row object: field <- column for each data.columns entry; a
    column mapped to another field is not read under its own name too; None is absent."""
    claimed = {col for field, col in columns.items() if field != col}
    obj = {k: v for k, v in raw.items() if v is not None and k not in claimed}
    for field, col in columns.items():
        obj.pop(field, None)
        if raw.get(col) is not None:  # a streamed JSON row may lack a column the first row had
            obj[field] = raw[col]
    return obj


def check_columns(source: str, names: list[str], columns: dict[str, str], needs: tuple[str, ...], flag: str) -> None:
    """Every mapped column exists, and a row finds one of the fields `needs`. `flag`: where the
    mapping came from (data.columns, --columns)."""
    for field, col in columns.items():
        if col not in names:
            raise DistillError(f"{source}: no column '{col}' ({flag} {field}); its columns: {', '.join(names)}")
    fields = set(columns) | (set(names) - set(columns.values()))
    if not fields & set(needs):
        wanted = " or ".join(f"'{f}'" for f in needs if f != "messages")
        raise DistillError(
            f"{source}: no {wanted} column (its columns: {', '.join(names)}); map one with {flag}, "
            f"e.g. {flag} {{prompt: question, completion: answer}}"
        )


def batched_rows(data, batch_size: int = 1024) -> Iterator[dict]:
    """The rows of a Dataset or IterableDataset as dicts, read a batch at a time (several times
    faster than row by row: one Arrow-to-Python conversion per batch)."""
    for batch in data.iter(batch_size=batch_size):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield dict(zip(keys, values))


def hf_objects(
    source: str,
    split: str | None = None,
    columns: dict[str, str] | None = None,
    streaming: bool = False,
    n: int | None = None,
    subset: str | None = None,
    default_split: str = "train",
    key: str = "data.split",
    needs: tuple[str, ...] = NEEDED,
    flag: str = "data.columns",
) -> Iterator[tuple[str, dict]]:
    """Yield ("SOURCE row N", row) for the rows of `source` (the first `n` with `streaming`, else
    all), each with data.columns applied. `key` is the config key the split came from; a row
    must find one of the fields `needs` (checked once, on the columns)."""
    columns = dict(columns or {})
    data = open_split(source, split, subset, streaming, default_split, key)
    rows = itertools.islice(batched_rows(data), n) if streaming else batched_rows(data)
    with reading(source):
        names = data.column_names
        first = True
        for i, raw in enumerate(rows):
            if first:  # a streamed dataset may not know its columns before its first row
                check_columns(source, names if names is not None else list(raw), columns, needs, flag)
                first = False
            yield f"{source} row {i + 1}", mapped(raw, columns)
        if first and names is not None:
            check_columns(source, names, columns, needs, flag)


def hf_rows(source: str, split: str | None, columns: dict[str, str], streaming: bool, n: int, subset: str | None,
            default_split: str = "train", key: str = "data.split") -> list[Row]:  # fmt: skip
    """Training rows of `source`, each checked as a JSONL row is (a bad one names its row number)."""
    objects = hf_objects(source, split, columns, streaming, n, subset, default_split, key)
    rows = [row_from_object(obj, where) for where, obj in objects]
    if not rows:
        raise DistillError(f"{source}: the dataset is empty")
    return rows
