"""Model references as users write them: ``name``, ``name:VERSION``, ``name@ALIAS``.

Apart from the registry so configs can check references without importing MLflow or torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aiaas import errors

_REF = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)"
    r"(?::(?P<version>\d+)|@(?P<alias>[A-Za-z][A-Za-z0-9_-]*))?$"
)


@dataclass(frozen=True)
class ModelRef:
    """``name``, ``name:VERSION`` or ``name@ALIAS`` as users write it."""

    name: str
    version: str | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version:
            return f"{self.name}:{self.version}"
        return f"{self.name}@{self.alias}" if self.alias else self.name


def parse_ref(text: str, *, needs_version: bool = False) -> ModelRef:
    """Parse ``name``, ``name:VERSION`` or ``name@ALIAS``.

    Raises:
        ConfigError: The text is none of these (or has no version/alias when one is needed).
    """
    match = _REF.match(text.strip())
    if not match or (needs_version and not (match["version"] or match["alias"])):
        raise errors.ConfigError(
            f"'{text}' is not a model reference",
            "Write NAME:VERSION (e.g. digits-mlp:3) or NAME@ALIAS (e.g. digits-mlp@production).",
        )
    return ModelRef(match["name"], match["version"], match["alias"])
