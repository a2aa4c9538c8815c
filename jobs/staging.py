"""Configs a command builds itself (not read from a file the user wrote), checked and written
under the storage root where the job reads them; :func:`jobs.submit.submit` stages them with the
job's files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from aiaas import errors, registry
from aiaas.config.optimize import OptimizeConfig
from aiaas.storage import Storage


@dataclass(frozen=True)
class StagedOptimize:
    """An optimize job's validated config, where it was written, and the parent it optimizes."""

    config: OptimizeConfig
    path: Path
    parent: registry.Version


def optimize_config(
    reference: str,
    method: str,
    max_accuracy_drop: float,
    max_latency_ratio: float | None,
    register_as: str | None,
    *,
    uri: str,
    storage: Storage,
) -> StagedOptimize:
    """Build, check and write the ``kind: optimize`` config of ``aiaas models optimize``.

    The parent is resolved in the registry at ``uri`` and must be an eager PyTorch version (the
    job would say the same after start-up). The file goes to ``optimize/<name>.yaml`` under the
    storage root, also for a dry run.

    Raises:
        ConfigError: A reference without version or alias, an unknown model or version, a parent
            that is not ``torch``, or values the config schema refuses.
    """
    data: dict[str, Any] = {
        "kind": "optimize",
        "model": reference,
        "method": method,
        "gate": {"max_accuracy_drop": max_accuracy_drop, "max_latency_ratio": max_latency_ratio},
    }
    if register_as:
        data["register_as"] = register_as
    registry.parse_ref(reference, needs_version=True)  # the user's words, the user's error
    parent = registry.resolve(registry.parse_ref(reference), uri)
    if parent.format != "torch":
        raise errors.ConfigError(
            f"{method} converts an eager PyTorch model, but {parent.name}:{parent.version} is "
            f"'{parent.format}'",
            "Optimize the version it was made from: "
            f"{parent.lineage.get('parent', 'see aiaas models show')}",
        )
    config = OptimizeConfig.model_validate(data)
    storage.write_text(f"optimize/{config.name}.yaml", yaml.safe_dump(data, sort_keys=False))
    return StagedOptimize(config, Path(storage.path("optimize", f"{config.name}.yaml")), parent)
