"""Assertions shared by the fault tests."""

import re


def one_line(result, code: int, pattern: str) -> str:
    """The command ended with `code`, no traceback, exactly one "error:" line on stderr,
    matching `pattern`, and free of terminal control characters. Returns that line."""
    assert result.code == code, result.err
    assert "Traceback" not in result.err, result.err
    lines = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.err
    assert re.search(pattern, lines[0]), lines[0]
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", lines[0]), repr(lines[0])
    return lines[0]
