"""Reading a run config: YAML, dotted command-line overrides, one-line errors.

    distill train run.yaml objective.alpha=0.7 train.steps=300

An unknown key or a wrong type stops with one line that names the key path, what was
expected and the nearest valid key (ConfigError, exit code 2), before anything is written.
"""

import difflib
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from distill.config.schema import RunConfig
from distill.errors import ConfigError, printable
from distill.paths import MAX_YAML_BYTES, load_yaml, read_text


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        keys.append(path)
        ann = field.annotation
        for cand in getattr(ann, "__args__", (ann,)):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                keys += _valid_keys(cand, path + ".")
    return keys


def _explain(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    path = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
    if e["type"] == "extra_forbidden":
        near = difflib.get_close_matches(path, _valid_keys(RunConfig), n=1, cutoff=0.5)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        return f"{source}: unknown key '{path}'{hint}"
    if e["type"] == "missing":
        return f"{source}: missing required key '{path}'"
    got = e.get("input")
    where = f"'{path}': " if path else ""
    msg = printable(e["msg"].removeprefix("Value error, "), 300)
    if e["type"] == "value_error" or isinstance(got, dict):
        return f"{source}: {where}{msg}"
    return f"{source}: {where}expected {msg.lower().removeprefix('input should be ')}, got {printable(repr(got), 200)}"


def apply_override(tree: dict, dotted: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in dotted:
        raise ConfigError(f"override '{dotted}' is not of the form key.path=value")
    key, raw = dotted.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override '{dotted}' has an empty key")
    try:
        value = load_yaml(raw, f"override '{key}'", ConfigError) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict:
    """A config file's tree: UTF-8, at most MAX_YAML_BYTES, bounded nesting and alias
    expansion (`distill.paths.load_yaml`); every problem a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = load_yaml(read_text(path, "config file", MAX_YAML_BYTES, ConfigError), str(path), ConfigError)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML ({problem})") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(tree).__name__}")
    return tree


def build_config(tree: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_explain(err, source)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config, apply dotted overrides, validate. Raises ConfigError."""
    tree = read_yaml(path)
    for o in overrides:
        apply_override(tree, o)
    return build_config(tree, source=str(path))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
