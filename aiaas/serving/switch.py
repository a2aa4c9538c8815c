"""Switching apps that follow an alias to the version it now names, and rolling them back.

A switch is a sequence of named steps: :func:`plan` the change, :func:`put` it,
:func:`wait_healthy`, :func:`confirm` that every replica reached serves the version; when one
fails, :func:`undo` it: :func:`restore` the previous config, :func:`record_failure` for
``aiaas serve status`` and :func:`move_alias_back`, so registry and serving agree.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiaas import aliases, errors, registry
from aiaas.serving import apps, control_plane, pins
from aiaas.serving.control_plane import ControlPlane
from aiaas.storage import Storage

if TYPE_CHECKING:
    from ray.serve.schema import ServeApplicationSchema, ServeInstanceDetails

    from aiaas.config.cluster import ClusterConfig

#: Asks of a status route per model when confirming: several asks reach several replicas.
CONFIRM_ASKS = 8


@dataclass(frozen=True)
class Switch:
    """A planned switch of the routes that serve ``name@alias`` to ``version``."""

    name: str
    alias: str
    version: str
    details: ServeInstanceDetails
    before: dict[str, ServeApplicationSchema]  # every running app's config, by name
    after: dict[str, ServeApplicationSchema]
    changed: dict[str, list[str]]  # the routes switched, by app

    @property
    def reference(self) -> str:
        return f"{self.name}@{self.alias}"

    def served_before(self) -> str | None:
        """The version the switched routes pinned before (the first one found)."""
        for app_name, routes in self.changed.items():
            app = self.before[app_name]
            kind = apps.kind_of(app)
            pinned = pins.of(app, kind.deployment).versions if kind else {}
            for route in routes:
                if pinned.get(route):
                    return pinned[route]
        return None


def follow_alias(
    cluster: ClusterConfig, name: str, alias: str, version: str, timeout_s: float = 300
) -> list[str]:
    """Switch every model-server app that serves ``name@alias`` to ``version``, in place.

    When a replica cannot load the version, the apps go back to what they served and the alias
    moves back too, so registry and serving agree; the error says why.

    Returns:
        The apps switched (empty when none serves that alias or Serve is not running).
    """
    with ControlPlane.editing(cluster) as plane:
        try:
            details = plane.details()
        except errors.ClusterError:
            return []
        planned = plan(details, name, alias, version, cluster.mlflow_url())
        if planned is None:
            return []
        put(plane, planned)
        try:
            wait_healthy(plane, planned, timeout_s)
            confirm(plane, planned)
        except errors.DeployError as exc:
            undo(plane, planned, exc, cluster)
            raise errors.DeployError(
                f"{exc.message}; the apps went back to the versions they served and "
                f"{planned.reference} was rolled back",
                exc.hint,
            ) from None
    return list(planned.changed)


def plan(
    details: ServeInstanceDetails, name: str, alias: str, version: str, uri: str | None
) -> Switch | None:
    """The switch of every route that serves ``name@alias``; None when no app serves it."""
    reference = f"{name}@{alias}"
    before = control_plane.deployed(details)
    after = dict(before)
    changed: dict[str, list[str]] = {}
    chosen: registry.Version | str | None = None
    for app_name, app in before.items():
        kind = apps.kind_of(app)
        if kind is None:
            continue
        routes = [e.name for e in kind.args_of(app).models if e.model == reference]
        if routes:
            chosen = chosen or _whole_version(name, version, uri)
            after[app_name] = pins.pin(app, kind.deployment, {route: chosen for route in routes})
            changed[app_name] = routes
    if not changed:
        return None
    return Switch(name, alias, version, details, before, after, changed)


def put(plane: ControlPlane, switch: Switch) -> None:
    """Send the switched config (every app, the unchanged ones as they run)."""
    plane.put(control_plane.config(switch.details, list(switch.after.values())))


def wait_healthy(plane: ControlPlane, switch: Switch, timeout_s: float) -> None:
    """Wait until the switched apps are healthy; new replicas that cannot load the version fail
    to start and Serve gives up on the app."""
    try:
        plane.wait_healthy(list(switch.changed), timeout_s)
    except control_plane.Broken as exc:
        raise errors.DeployError(
            f"app '{exc.app}' could not load {', '.join(switch.changed[exc.app])} "
            f"version {switch.version}: {exc.cause}",
            exc.hint,
        ) from None


def confirm(plane: ControlPlane, switch: Switch) -> None:
    """Every replica reached must serve the version (``reconfigure`` keeps the old one when the
    new one fails to load, and the app stays healthy)."""
    url = control_plane.serve_url(switch.details)
    for app_name, routes in switch.changed.items():
        app = switch.after[app_name]
        kind = apps.kind_of(app)
        assert kind is not None  # planned for our apps only
        prefix = app.route_prefix or "/"
        for route in routes:
            for _ in range(CONFIRM_ASKS):
                failed = plane.model_status(kind.status_url(url, prefix, route)).get(
                    "failed_version"
                )
                if failed:
                    raise errors.DeployError(
                        f"app '{app_name}' could not load {route} version {switch.version}: "
                        f"{failed.get('error')}",
                        "Fix or re-register the version; the previous one kept serving.",
                    )


def undo(
    plane: ControlPlane, switch: Switch, exc: errors.DeployError, cluster: ClusterConfig
) -> None:
    """Take back a switch that failed: config, record, alias."""
    restore(plane, switch)
    record_failure(Storage(cluster.storage_root), switch, exc.message)
    move_alias_back(switch, cluster.mlflow_url())


def restore(plane: ControlPlane, switch: Switch) -> None:
    """Put back the config every app ran before the switch."""
    plane.put(control_plane.config(switch.details, list(switch.before.values())))


def record_failure(storage: Storage, switch: Switch, error: str) -> None:
    """Keep why the switch failed beside each app, for ``aiaas serve status``."""
    record = {"at": time.time(), "model": f"{switch.name}:{switch.version}", "error": error}
    for app_name in switch.changed:
        storage.write_text(_failure_path(app_name), json.dumps(record))


def last_failure(storage: Storage, app_name: str) -> dict[str, Any] | None:
    """The last failed switch of an app (``at``, ``model``, ``error``), if any."""
    found = storage.read_text(_failure_path(app_name))
    return dict(json.loads(found)) if found else None


def move_alias_back(switch: Switch, uri: str | None) -> None:
    """Point the alias where traffic goes again, unless someone moved it meanwhile."""
    served_before = switch.served_before()
    if served_before and aliases.holder(switch.name, switch.alias, uri) == switch.version:
        aliases.move_back(switch.name, switch.alias, served_before, uri)


def _whole_version(name: str, version: str, uri: str | None) -> registry.Version | str:
    """The version to pin with its record; just its number when the registry cannot say (the
    replicas then ask it themselves, as before records existed)."""
    try:
        return registry.resolve(registry.ModelRef(name, version=version), uri)
    except errors.AiaasError:
        return version


def _failure_path(app_name: str) -> str:
    return f"serve/apps/{app_name}/last_failed_switch.json"


def rollback(cluster: ClusterConfig, app_name: str) -> list[str]:
    """Switch an app back to the versions it served before: every alias it follows moves back.

    Returns:
        Lines saying what moved.

    Raises:
        ConfigError: Unknown app, an app that pins versions, or nothing to roll back to.
    """
    with ControlPlane.of(cluster) as plane:
        running = control_plane.deployed(plane.details())
    if app_name not in running:
        raise control_plane.unknown_app(app_name, list(running))
    app = running[app_name]
    kind = apps.kind_of(app)
    if kind is None:
        raise errors.ConfigError(
            f"Serve app '{app_name}' serves no registered model; roll it back with its own config"
        )
    lines = []
    for entry in kind.args_of(app).models:
        ref = registry.parse_ref(entry.model)
        if not ref.alias:
            raise errors.ConfigError(
                f"app '{app_name}' pins {entry.model} for '{entry.name}', so there is "
                "no earlier version to go back to",
                "Serve NAME@ALIAS to get rollbacks, or deploy the version you want.",
            )
        move = aliases.rollback(ref.name, ref.alias, cluster.mlflow_url())
        follow_alias(cluster, ref.name, ref.alias, move.to_version)
        lines.append(f"{ref}: {move.from_version} → {move.to_version}")
    return lines
