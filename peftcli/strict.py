"""The strict pydantic base every recipe section and method spec derives from, and the value types
their keys share.

`extra="forbid"` is what turns a typo into an error instead of a silently ignored key.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True)


def refuse_bool(value):
    # pydantic's lax mode reads true as 1 (and 1.0): `batch_size: true` would silently train with
    # batch size 1. Lax mode stays on for the rest: "1e-4" (a string, as YAML reads it) still works.
    if isinstance(value, bool):
        raise ValueError("expects a number, not true/false")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    if "\x00" in value:  # no file system or hub takes it; it only garbles the messages that show it
        raise ValueError("contains a NUL character")
    return value


# Every int or float key of a recipe uses one of these (tests/test_hostile_input.py checks it). The
# range comes before NoBool so that it stays on the number's own schema (`peftcli schema` shows it).
NoBool = BeforeValidator(refuse_bool)
Int = Annotated[int, NoBool]
Float = Annotated[float, NoBool]
PositiveInt = Annotated[int, Field(gt=0), NoBool]
NonNegativeInt = Annotated[int, Field(ge=0), NoBool]
PositiveFloat = Annotated[float, Field(gt=0), NoBool]
NonNegativeFloat = Annotated[float, Field(ge=0), NoBool]
Probability = Annotated[float, Field(ge=0, lt=1), NoBool]
OpenFraction = Annotated[float, Field(gt=0, lt=1), NoBool]
# A path, a hub id or a name: "" would silently mean "the current directory" or "nothing".
Name = Annotated[str, AfterValidator(_not_blank)]
