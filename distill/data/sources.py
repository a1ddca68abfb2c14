"""What a `data.source` string names, from the string alone (no file read, no heavy import).

    builtin:chain, builtin:grammar    the built-in tasks
    hf:PATH                           read through Hugging Face `datasets` (distill.data.hf):
                                      a save_to_disk folder, a parquet / arrow / JSON / CSV
                                      file, a folder of such files, or a hub dataset name
    FILE.parquet, FILE.arrow          the same as hf:FILE (distill has no reader of its own)
    anything else                     a JSONL file read by distill itself (file:line errors)

The config reads this module to check `data.eval_source` without importing torch or datasets.
"""

from pathlib import Path

HF_PREFIX = "hf:"
DATASETS_SUFFIXES = (".parquet", ".arrow")  # read through datasets without the hf: prefix
# distill row fields that data.columns may map to dataset columns
ROW_FIELDS = ("prompt", "completion", "text", "answer", "rationale", "messages")


def is_hf(source: str) -> bool:
    """Whether rows of `source` are read through Hugging Face `datasets`."""
    return source.startswith(HF_PREFIX) or Path(source).suffix.lower() in DATASETS_SUFFIXES


def hf_target(source: str) -> str:
    """The path or hub name of an hf source (the prefix removed)."""
    return source.removeprefix(HF_PREFIX)


def looks_local(target: str) -> bool:
    """Whether `target` is meant as a local path rather than a hub name ("owner/name"): it
    starts like a path (/, ., ~) or ends in a data file's extension."""
    return target.startswith(("/", ".", "~")) or Path(target).suffix.lower() in (
        *DATASETS_SUFFIXES, ".json", ".jsonl", ".csv", ".txt"
    )


def local_path(source: str) -> Path | None:
    """The local file or folder an hf source names, or None for a hub name. A path that
    looks local but does not exist is returned as is (the reader names it as missing)."""
    target = hf_target(source)
    path = Path(target).expanduser()
    if path.exists() or looks_local(target):
        return path
    return None
