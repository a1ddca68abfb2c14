"""The evaluation settings (`eval:`) and the release gates (`gates:`) of a run config."""

import re
from typing import Any

from pydantic import Field, ValidationInfo, create_model, field_validator, model_serializer

from distill.config.base import Section
from distill.errors import ConfigError
from distill.eval.gates import METRICS as GATE_METRICS
from distill.eval.gates import parse_gate


class EvalConfig(Section):
    max_new_tokens: int = Field(48, ge=1)
    """Tokens generated per held-out prompt (greedy)."""
    batch_size: int = Field(128, ge=1)
    """Prompts generated at once."""
    answer_format: str = "auto"
    """Where the answer is in a generation (`distill.eval.answers`): auto, gsm8k, boxed,
    answer_line, chain or regex:PATTERN. The built-in task always uses chain."""
    teacher: bool = True
    """Also evaluate the run's teacher (when it has one) and compare: top-1 agreement,
    held-out divergences, the teacher's accuracy and loss, generation length drift."""
    calibration_bins: int = Field(15, ge=1)
    """Equal-width confidence bins of the expected calibration error."""
    refusal_patterns: list[str] = [r"\bI can(?:'|’)?t\b", r"\bI cannot\b", r"\bI(?:'|’)m sorry\b", r"\bAs an AI\b"]  # noqa: RUF012 (pydantic copies defaults)
    """Regular expressions (searched, case-insensitive) that mark a generation as a refusal."""
    format_regex: str | None = None
    """A regular expression every generation should match whole (format adherence); null:
    not checked (the built-in task checks its own format: steps, '#', one digit)."""
    format_json_schema: dict[str, Any] | None = None
    """A JSON schema every generation should parse as and validate against (format adherence)."""
    text_prompt_tokens: int = Field(32, ge=1)
    """{"text"} rows: the first this many tokens of a held-out row (at most half of it) are
    the prompt both models continue greedily for the generation-length drift."""
    text_generations: int = Field(64, ge=0)
    """{"text"} rows: how many held-out rows give a prompt for the generation-length drift
    (each generates up to max_new_tokens); 0 leaves generation out."""

    @field_validator("answer_format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        from distill.eval.answers import splitter

        try:
            splitter(value)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return value

    @field_validator("refusal_patterns", "format_regex", "format_json_schema")
    @classmethod
    def _valid_format(cls, value, info: ValidationInfo):
        from jsonschema import SchemaError, validators

        if value is None:
            return value
        if info.field_name == "format_json_schema":
            try:
                validators.validator_for(value).check_schema(value)
            except SchemaError as e:
                raise ValueError(f"not a valid JSON schema ({e.message})") from None
            return value
        for pattern in [value] if isinstance(value, str) else value:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{pattern!r} is not a valid regular expression ({e})") from None
        return value


class _Gates(Section):
    """Release gates checked by `distill eval --gates` (`distill.eval.gates`): metric -> an operator
    (>=, <=, >, <, ==) then a number, 'teacher' or 'NUMBER * teacher'. Unset gates are off."""

    @field_validator("*")
    @classmethod
    def _parses(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            parse_gate(info.field_name, value)
        return value

    @model_serializer(mode="wrap")
    def _set_only(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}

    def expressions(self) -> dict[str, str]:
        """The gates that are set: metric -> expression."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


# One optional expression per gate metric, documented where the metrics are (distill.eval.gates).
GatesConfig = create_model(
    "GatesConfig", __base__=_Gates, **{m: (str | None, Field(None, description=d)) for m, (_, _, d) in GATE_METRICS.items()}
)
