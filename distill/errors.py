"""User-facing errors: one line, a non-zero exit, never a stack trace (unless --debug)."""

import re


class DistillError(Exception):
    """A problem with the user's input (file, config, data, models). Printed as one line."""

    exit_code = 1


class ConfigError(DistillError):
    """A config key or value is wrong. Exit code 2, nothing written."""

    exit_code = 2


# C0 controls but tab, DEL and the C1 controls (CSI among them): what a terminal acts on.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_ESCAPE_SEQUENCE = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-_])")


def printable(text: str, limit: int | None = None) -> str:
    """`text` safe to print on one terminal line: ANSI escape sequences removed, every other
    control character (newlines included) shown as its \\x escape; cut to `limit` characters."""
    text = _ESCAPE_SEQUENCE.sub("", str(text))
    text = _CONTROL.sub(lambda m: "\\n" if m.group() == "\n" else f"\\x{ord(m.group()):02x}", text)
    if limit is not None and len(text) > limit:
        text = text[:limit] + "..."
    return text
