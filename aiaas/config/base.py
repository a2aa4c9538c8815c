"""The shared base of every config schema: strict, immutable, documented fields."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

#: A TCP port a server binds; 0 is not allowed because users read ports from configs.
Port = Annotated[int, Field(ge=1, le=65535)]

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")


def _check_name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(
            f"'{value}' is not a valid name; use 1-40 lower-case letters, digits and '-', "
            "starting and ending with a letter or digit (e.g. 'cpu-workers')"
        )
    return value


#: Names that end up in Ray node names, Kubernetes object names and file paths.
Name = Annotated[str, AfterValidator(_check_name)]


class ConfigModel(BaseModel):
    """Base of every config section: unknown keys are errors, values never change after load."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
