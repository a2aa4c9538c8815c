"""What ``aiaas models show`` tells about one registered version beyond its own tags: the
lineage back to the trained original, and the signature its artifact records."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiaas import registry


@dataclass(frozen=True)
class LineageStep:
    """One version of a lineage chain, with its lineage tags (less ``ready`` and ``format``)."""

    model: str
    version: str
    format: str
    tags: dict[str, str]


def lineage(version: registry.Version, uri: str | None = None) -> list[LineageStep]:
    """The version's lineage, then its parent's (the ``parent`` tag), back to the trained
    original; a loop in the tags ends the walk."""
    chain: list[LineageStep] = []
    seen = set()
    current: registry.Version | None = version
    # Keyed by model and version: a parent may be another model's version (an adapter's base).
    while current is not None and (current.name, current.version) not in seen:
        seen.add((current.name, current.version))
        tags = {k: v for k, v in current.lineage.items() if k not in ("ready", "format")}
        chain.append(LineageStep(current.name, current.version, current.format, tags))
        parent = tags.get("parent")
        current = registry.resolve(registry.parse_ref(parent), uri) if parent else None
    return chain


def signature(version: registry.Version) -> str:
    """The artifact's input and output signature as one line: ``(none)`` if it records none,
    ``(unknown)`` if the artifact cannot be read (incomplete or foreign).

    Reads through this process's MLflow registry (see :func:`aiaas.registry.use_server`).
    """
    try:
        from mlflow.models import get_model_info

        recorded = get_model_info(version.uri).signature
    except Exception:  # an incomplete or foreign artifact: show what is known
        return "(unknown)"
    if recorded is None:
        return "(none)"
    inputs: Any = recorded.inputs.to_dict() if recorded.inputs else []
    outputs: Any = recorded.outputs.to_dict() if recorded.outputs else []
    return f"inputs {json.dumps(inputs)} → outputs {json.dumps(outputs)}"
