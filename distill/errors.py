"""User-facing errors: one line, a non-zero exit, never a stack trace."""


class DistillError(Exception):
    """A problem with the user's input (file, config, data, models). Printed as one line."""

    exit_code = 1


class ConfigError(DistillError):
    """A config key or value is wrong. Exit code 2, nothing written."""

    exit_code = 2
