"""Serve applications as the aiaas CLI drives them: deploy, status, delete.

Model-server apps get their versions pinned in the deployment's ``user_config``
(:mod:`aiaas.serving.pins`): a pin change is applied in place by the replicas' ``reconfigure``
(old version answers until the new one is loaded), so promote and rollback need no restart
(:mod:`aiaas.serving.switch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from aiaas import errors, registry
from aiaas.config import loader
from aiaas.config.cluster import ClusterConfig
from aiaas.serving import apps, control_plane, pins, switch
from aiaas.serving.control_plane import ControlPlane
from aiaas.storage import Storage

if TYPE_CHECKING:
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema


@dataclass
class AppStatus:
    """One Serve application as ``aiaas serve status`` shows it."""

    name: str
    status: str
    route_prefix: str
    message: str
    replicas: dict[str, int]
    models: list[dict[str, Any]] = field(default_factory=list)
    last_failure: dict[str, Any] | None = None


def read_config(path: Path) -> ServeDeploySchema:
    """A Serve config file, checked with Serve's schema and each app's ``Args``."""
    return loader.load_serve(path)


def deploy(
    cluster: ClusterConfig, path: Path, timeout_s: float = 300, dry_run: bool = False
) -> list[str]:
    """Deploy the apps of a Serve config file beside the apps already running; wait until ready.

    Model references are resolved in the registry first and pinned. When an app fails to
    become healthy, the apps' previous configs are put back, so the last good versions keep
    serving.

    Returns:
        The names of the apps deployed.

    Raises:
        ConfigError: Bad file or unknown model/version/alias. DeployError: an app failed.
    """
    wanted = read_config(path)
    uri = cluster.mlflow_url()
    resolved = [_pinned(path, app, uri) for app in wanted.applications]
    names = [app.name for app in resolved]
    if dry_run:
        return names
    with ControlPlane.editing(cluster) as plane:
        details = plane.details()
        previous = control_plane.deployed(details)
        base = wanted
        if details.applications:
            # Serve keeps its first HTTP options; send those, not a file's differing ones.
            kept = {"http_options": details.http_options, "proxy_location": details.proxy_location}
            base = wanted.model_copy(update={k: v for k, v in kept.items() if v is not None})
        merged = {**previous, **{app.name: app for app in resolved}}
        _check_routes(path, merged, names)
        plane.put(base.model_copy(update={"applications": list(merged.values())}))
        try:
            plane.wait_healthy(names, timeout_s)
        except errors.DeployError:
            plane.put(base.model_copy(update={"applications": list(previous.values())}))
            raise
    return names


def _check_routes(path: Path, merged: dict[str, ServeApplicationSchema], names: list[str]) -> None:
    """Refuse two apps on one route prefix before Serve does (its error names neither app's
    file nor the way out)."""
    owners: dict[str, str] = {}
    for name, app in merged.items():
        prefix = (app.route_prefix or "/").rstrip("/") or "/"
        other = owners.setdefault(prefix, name)
        if other != name:
            new, running = (name, other) if name in names else (other, name)
            raise errors.ConfigError(
                f"{path}: app '{new}' wants route prefix {prefix}, which app '{running}' holds",
                f"Give one of them another route_prefix (beside the LLM app at /v1, the "
                f"embeddings app works at /v1/embeddings: configs/serve/demo.yaml), or "
                f"delete it first: aiaas serve delete {running}",
            )


def _pinned(path: Path, app: ServeApplicationSchema, uri: str | None) -> ServeApplicationSchema:
    """The app with each of its models' versions resolved and pinned whole."""
    kind = apps.kind_of(app)
    if kind is None:
        return app
    args = kind.args_of(app)
    if isinstance(args, apps.LLMArgs) and args.engine == "vllm":
        return app  # Ray Serve LLM's deployments take no pins: versions resolve at build
    found: dict[str, registry.Version | str] = {}
    for entry in args.models:
        where = f"{path}: app '{app.name}', model '{entry.name}'"
        try:
            version = registry.resolve(registry.parse_ref(entry.model), uri)
        except errors.ConfigError as exc:
            raise errors.ConfigError(f"{where}: {exc.message}", exc.hint) from None
        if version.format not in kind.formats:
            raise errors.ConfigError(
                f"{where}: {version.name}:{version.version} is a '{version.format}' model, "
                f"which {app.import_path} does not serve (it serves "
                f"{', '.join(kind.formats)})",
                f"Serve embedding models with {apps.EMBEDDINGS.import_path}, language "
                f"models with {apps.LLM.import_path} and classifiers with "
                f"{apps.MODEL_SERVER.import_path}.",
            )
        found[entry.name] = version
    if isinstance(args, apps.LLMArgs):
        _check_adapters(path, app, args, found)
    return pins.pin(app, kind.deployment, found)


def _check_adapters(
    path: Path, app: ServeApplicationSchema, args: apps.LLMArgs, found: dict[str, Any]
) -> None:
    """LLM entries are causal LMs, adapters (``adapter_of``) are adapters of that base model."""
    causal_format, adapters_format = apps.LLM.formats
    for entry in args.models:
        version = found[entry.name]
        where = f"{path}: app '{app.name}', model '{entry.name}'"
        wanted = adapters_format if entry.adapter_of else causal_format
        if version.format != wanted:
            hint = (
                "Name a version that aiaas finetune registered, or drop adapter_of."
                if entry.adapter_of
                else "Serve an adapter with adapter_of: <its base model's name> beside the base."
            )
            raise errors.ConfigError(
                f"{where}: {version.name}:{version.version} is a '{version.format}' model; "
                f"{'adapter_of needs' if entry.adapter_of else 'a base model entry needs'} "
                f"a '{wanted}' one",
                hint,
            )
        if entry.adapter_of is None:
            continue
        base = found[entry.adapter_of]
        parent = version.lineage.get("parent", "")
        if parent.split(":", 1)[0] != base.name:
            raise errors.ConfigError(
                f"{where}: {version.name}:{version.version} was trained on {parent or 'an unknown'}"
                f" base model, but '{entry.adapter_of}' serves {base.name}:{base.version}",
                f"Serve it with adapter_of naming an entry of {parent.split(':', 1)[0]}.",
            )


def status(cluster: ClusterConfig) -> tuple[str, list[AppStatus]]:
    """Serve's URL and every app with its replicas and, for model servers, what each model
    serves (asked of the app itself, so a failed switch shows)."""
    storage = Storage(cluster.storage_root)
    with ControlPlane.of(cluster) as plane:
        details = plane.details()
        url = control_plane.serve_url(details)
        result = []
        for name, app in details.applications.items():
            replicas: dict[str, int] = {}
            for deployment in app.deployments.values():
                for replica in deployment.replicas:
                    state = replica.state.value
                    replicas[state] = replicas.get(state, 0) + 1
            row = AppStatus(
                name=name,
                status=app.status.value,
                route_prefix=app.route_prefix or "",
                message=control_plane.told(app)
                if app.status.value != control_plane.HEALTHY
                else "",
                replicas=replicas,
            )
            if app.deployed_app_config is not None:
                row.models = _model_states(plane, url, row.route_prefix, app.deployed_app_config)
            row.last_failure = switch.last_failure(storage, name)
            result.append(row)
    return url, result


def _model_states(
    plane: ControlPlane, url: str, prefix: str, app: ServeApplicationSchema
) -> list[dict[str, Any]]:
    kind = apps.kind_of(app)
    if kind is None:
        return []
    pinned = pins.of(app, kind.deployment).versions
    states = []
    for entry in kind.args_of(app).models:
        state: dict[str, Any] = {
            "name": entry.name,
            "model": entry.model,
            "pinned": pinned.get(entry.name),
            "url": kind.call_line(url, prefix, entry.name),
        }
        try:
            state.update(plane.model_status(kind.status_url(url, prefix, entry.name), 5))
        except (httpx.HTTPError, ValueError) as exc:
            state["error"] = f"not answering: {exc}"
        states.append(state)
    return states


def delete(cluster: ClusterConfig, name: str, timeout_s: float = 120) -> None:
    """Delete one app, keeping the others, and wait until Serve has let it go (so what runs
    next, or ``serve status``, sees it gone and its CPUs free).

    Raises:
        ConfigError: No app of that name. DeployError: Serve still deletes it at ``timeout_s``.
    """
    with ControlPlane.editing(cluster) as plane:
        details = plane.details()
        running = control_plane.deployed(details)
        if name not in running:
            raise control_plane.unknown_app(name, list(running))
        del running[name]
        plane.put(control_plane.config(details, list(running.values())))
        plane.wait_gone(name, timeout_s)


def apps_serving(cluster: ClusterConfig, name: str, version: str) -> list[str]:
    """The apps (and model routes) whose pins say they serve ``name:version``."""
    try:
        with ControlPlane.of(cluster, timeout_s=3) as plane:
            running = control_plane.deployed(plane.details())
    except errors.ClusterError:
        return []
    found = []
    for app_name, app in running.items():
        kind = apps.kind_of(app)
        if kind is None:
            continue
        pinned = pins.of(app, kind.deployment).versions
        for entry in kind.args_of(app).models:
            if registry.parse_ref(entry.model).name == name and pinned.get(entry.name) == version:
                found.append(f"{app_name}/{entry.name}")
    return found
