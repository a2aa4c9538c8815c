"""The pin contract: which registered version each model route of a deployment serves.

A model-server deployment's ``user_config`` carries it, and nothing else writes or reads it::

    user_config:
      versions: {ROUTE: "N"}             # the version each served name loads
      version_records: {ROUTE: {...}}    # registry.Version.pin() of a version given whole

The deployer writes it (:func:`pin`); replicas read it at start and on ``reconfigure``
(:meth:`Pins.read`, :meth:`Pins.recorded`). A record lets a new replica load its version without
asking the registry; a bare number (the registry could not be asked) carries none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiaas import registry

if TYPE_CHECKING:
    from ray.serve.schema import ServeApplicationSchema

VERSIONS = "versions"
RECORDS = "version_records"


@dataclass(frozen=True)
class Pins:
    """The versions one deployment pins, by served name, and the records of those given whole."""

    versions: dict[str, str] = field(default_factory=dict)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def read(cls, user_config: object) -> Pins:
        """The pins of a deployment's ``user_config`` (none when it has none: Serve's schema
        holds a ``DEFAULT`` sentinel for a field left out)."""
        found = user_config if isinstance(user_config, Mapping) else {}
        versions = {str(k): str(v) for k, v in (found.get(VERSIONS) or {}).items()}
        records = {str(k): v for k, v in (found.get(RECORDS) or {}).items() if isinstance(v, dict)}
        return cls(versions, records)

    def pinned(self, changes: Mapping[str, registry.Version | str]) -> Pins:
        """These pins with ``changes``: a version given whole pins its number and its record,
        a bare number drops the route's now stale record."""
        versions, records = dict(self.versions), dict(self.records)
        for route, version in changes.items():
            if isinstance(version, registry.Version):
                versions[route], records[route] = version.version, version.pin()
            else:
                versions[route] = version
                records.pop(route, None)
        return Pins(versions, records)

    def recorded(self, route: str, model: str, version: str | None) -> registry.Version | None:
        """The version the record of ``route`` describes, when it is ``model:version``; None
        when there is no such record, or one that lacks a field (the caller asks the
        registry)."""
        record = self.records.get(route, {})
        if version is None or (record.get("model"), record.get("version")) != (model, version):
            return None
        try:
            return registry.Version.from_pin(record)
        except KeyError:
            return None

    def user_config(self, base: object = None) -> dict[str, Any]:
        """``base`` (the deployment's other ``user_config`` keys, if any) with these pins."""
        kept = base if isinstance(base, Mapping) else {}
        return {**kept, VERSIONS: dict(self.versions), RECORDS: dict(self.records)}


def of(app: ServeApplicationSchema, deployment: str) -> Pins:
    """What the ``deployment`` of a Serve app config pins."""
    for entry in app.deployments:
        if entry.name == deployment:
            return Pins.read(entry.user_config)
    return Pins()


def pin(
    app: ServeApplicationSchema, deployment: str, changes: Mapping[str, registry.Version | str]
) -> ServeApplicationSchema:
    """A copy of a Serve app config whose ``deployment`` pins ``changes`` (the entry is added
    when the config names none)."""
    from ray.serve.schema import DeploymentSchema

    entries = list(app.deployments)
    index = next((i for i, entry in enumerate(entries) if entry.name == deployment), None)
    if index is None:
        entries.append(DeploymentSchema(name=deployment))
        index = len(entries) - 1
    entry = entries[index]
    user_config = Pins.read(entry.user_config).pinned(changes).user_config(entry.user_config)
    entries[index] = entry.model_copy(update={"user_config": user_config})
    return app.model_copy(update={"deployments": entries})
