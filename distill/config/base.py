"""The base of every config section: unknown keys refused, one docstring per field, finite floats."""

from pydantic import BaseModel, ConfigDict, model_validator


class Section(BaseModel):
    # No NaN or infinity anywhere: every float of a run config is a finite setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data):
        """No setting holds a NUL character (no file name can; the OS would raise)."""
        if isinstance(data, dict):
            for key, value in data.items():
                if isinstance(value, str) and "\x00" in value:
                    raise ValueError(f"{key} holds a NUL character, which no file name or setting may")
        return data
