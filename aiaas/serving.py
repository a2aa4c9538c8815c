"""Serve applications as the aiaas CLI drives them: deploy, status, switch versions, delete.

Everything goes through Serve's declarative REST API on the dashboard
(``PUT /api/serve/applications/`` with a whole config), the same path ``serve deploy`` takes, so an
app deployed either way is managed either way. Model-server apps get their versions pinned in the
deployment's ``user_config``: a pin change is applied in place by the replicas' ``reconfigure``
(old version answers until the new one is loaded), so promote and rollback need no restart.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from aiaas import aliases, errors, ray_auth, registry
from aiaas.config import loader
from aiaas.config.cluster import ClusterConfig
from aiaas.dashboard import Dashboard
from aiaas.storage import Storage


@dataclass(frozen=True)
class ModelApp:
    """One of our Serve apps that serves registered versions, and how to reach its models."""

    deployment: str
    formats: tuple[str, ...]
    status_path: str  # GET, relative to the route prefix
    call: str  # what clients call, relative to the route prefix

    def status_url(self, base: str, prefix: str, name: str) -> str:
        return f"{base}{prefix.rstrip('/')}{self.status_path.format(name=name)}"


CLASSIFIER_FORMATS = ("torch", "dynamic-int8", "torchscript", "onnx")
#: Our apps that serve registered versions, by import path.
MODEL_APPS = {
    "serve_apps.model_server:build_app": ModelApp(
        "ModelServer", CLASSIFIER_FORMATS, "/{name}", "POST /{name}:predict"
    ),
    "serve_apps.embeddings:build_app": ModelApp(
        "Embeddings", ("sentence-transformers",), "/embeddings/{name}", "POST /embeddings"
    ),
}
HEALTHY = "RUNNING"
BROKEN = ("DEPLOY_FAILED", "UNHEALTHY")


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


def read_config(path: Path) -> dict[str, Any]:
    """A Serve config file, checked with Serve's schema and each app's ``Args``."""
    loader.check(path)
    data, _ = loader.read_mapping(path)
    return data


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
    data = read_config(path)
    uri = cluster.mlflow_url()
    apps = [copy.deepcopy(app) for app in data.get("applications") or []]
    for app in apps:
        kind = MODEL_APPS.get(str(app.get("import_path")))
        if kind is None:
            continue
        pins: dict[str, registry.Version | str] = {}
        for entry in (app.get("args") or {}).get("models", []):
            where = f"{path}: app '{app['name']}', model '{entry['name']}'"
            try:
                version = registry.resolve(registry.parse_ref(entry["model"]), uri)
            except errors.ConfigError as exc:
                raise errors.ConfigError(f"{where}: {exc.message}", exc.hint) from None
            if version.format not in kind.formats:
                raise errors.ConfigError(
                    f"{where}: {version.name}:{version.version} is a '{version.format}' model, "
                    f"which {app['import_path']} does not serve (it serves "
                    f"{', '.join(kind.formats)})",
                    "Serve embedding models with serve_apps.embeddings:build_app and "
                    "classifiers with serve_apps.model_server:build_app.",
                )
            pins[entry["name"]] = version
        _set_pins(app, pins)
    if dry_run:
        return [str(app["name"]) for app in apps]
    with Dashboard(cluster.dashboard_url(), cluster.auth_mode) as dashboard:
        details = _details(dashboard)
        previous = _deployed_apps(details)
        merged = {**previous, **{str(app["name"]): app for app in apps}}
        base = {key: value for key, value in data.items() if key != "applications"}
        if details.get("applications"):
            # Serve keeps its first HTTP options; send those, not a file's differing ones.
            base["http_options"] = details.get("http_options") or base.get("http_options")
            base["proxy_location"] = details.get("proxy_location") or base.get("proxy_location")
        config = {**base, "applications": list(merged.values())}
        dashboard.put_serve(config)
        names = [str(app["name"]) for app in apps]
        try:
            _wait(dashboard, names, timeout_s)
        except errors.DeployError:
            restored = {**base, "applications": list(previous.values())}
            dashboard.put_serve(restored)
            raise
    return names


def _set_pins(app: dict[str, Any], pins: dict[str, registry.Version | str]) -> None:
    """Pin versions in the app's ``user_config``: the numbers, and for each version given whole
    a record that lets a new replica load it without asking the registry (a bare number's
    replicas ask the registry)."""
    deployment = MODEL_APPS[str(app["import_path"])].deployment
    deployments = app.setdefault("deployments", [])
    mine = [d for d in deployments if d.get("name") == deployment]
    if not mine:
        deployments.append({"name": deployment})
        mine = deployments[-1:]
    user_config = dict(mine[0].get("user_config") or {})
    versions = dict(user_config.get("versions", {}))
    records = dict(user_config.get("version_records", {}))
    for route, version in pins.items():
        if isinstance(version, registry.Version):
            versions[route], records[route] = version.version, version.pin()
        else:
            versions[route] = version
            records.pop(route, None)
    user_config["versions"], user_config["version_records"] = versions, records
    mine[0]["user_config"] = user_config


def _pins(app: dict[str, Any]) -> dict[str, str]:
    kind = MODEL_APPS.get(str(app.get("import_path")))
    for deployment in app.get("deployments") or []:
        if kind is not None and deployment.get("name") == kind.deployment:
            return dict((deployment.get("user_config") or {}).get("versions", {}))
    return {}


def _details(dashboard: Dashboard) -> dict[str, Any]:
    try:
        return dashboard.serve_details()
    except errors.ClusterError:
        if not dashboard.reachable():
            raise
        return {}  # the dashboard answers but Serve has not started yet


def _deployed_apps(details: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: copy.deepcopy(app["deployed_app_config"])
        for name, app in (details.get("applications") or {}).items()
        if app.get("deployed_app_config")
    }


def _wait(dashboard: Dashboard, names: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    # Serve may still report the old state for a moment after the PUT.
    time.sleep(1.0)
    while True:
        apps = (_details(dashboard).get("applications")) or {}
        states = {name: apps.get(name, {}) for name in names}
        broken = {n: a for n, a in states.items() if a.get("status") in BROKEN}
        if broken:
            name, app = next(iter(broken.items()))
            raise _Broken(name, app["status"], _app_message(app))
        if all(a.get("status") == HEALTHY and _deployments_healthy(a) for a in states.values()):
            return
        if time.monotonic() > deadline:
            waiting = {n: a.get("status", "absent") for n, a in states.items()}
            raise errors.DeployError(
                f"Serve apps not ready after {timeout_s:.0f}s: {waiting}",
                "See 'aiaas serve status' and the Serve logs in the Ray dashboard.",
            )
        time.sleep(0.5)


class _Broken(errors.DeployError):
    """An app Serve gave up on (its replicas failed to start or went unhealthy)."""

    def __init__(self, app: str, state: str, cause: str) -> None:
        super().__init__(
            f"Serve app '{app}' is {state}: {cause}",
            "The previous config was put back; fix the cause and deploy again.",
        )
        self.app, self.cause = app, cause


def _deployments_healthy(app: dict[str, Any]) -> bool:
    return all(d.get("status") == "HEALTHY" for d in (app.get("deployments") or {}).values())


def _app_message(app: dict[str, Any]) -> str:
    messages = [app.get("message") or ""] + [
        d.get("message") or "" for d in (app.get("deployments") or {}).values()
    ]
    text = " ".join(errors.without_traceback(m) for m in messages if m.strip())
    return text[-1500:] or "(no message)"


def serve_url(details: dict[str, Any]) -> str:
    """The HTTP address Serve's proxy listens on."""
    options = details.get("http_options") or {}
    return f"http://{options.get('host') or '127.0.0.1'}:{options.get('port') or 8000}"


def status(cluster: ClusterConfig) -> tuple[str, list[AppStatus]]:
    """Serve's URL and every app with its replicas and, for model servers, what each model
    serves (asked of the app itself, so a failed switch shows)."""
    with Dashboard(cluster.dashboard_url(), cluster.auth_mode) as dashboard:
        details = _details(dashboard)
    url = serve_url(details)
    result = []
    for name, app in (details.get("applications") or {}).items():
        replicas: dict[str, int] = {}
        for deployment in (app.get("deployments") or {}).values():
            for replica in deployment.get("replicas") or []:
                replicas[replica["state"]] = replicas.get(replica["state"], 0) + 1
        row = AppStatus(
            name=name,
            status=str(app.get("status")),
            route_prefix=str(app.get("route_prefix") or ""),
            message=_app_message(app) if app.get("status") != HEALTHY else "",
            replicas=replicas,
        )
        config = app.get("deployed_app_config") or {}
        if config.get("import_path") in MODEL_APPS:
            row.models = _model_states(url, row.route_prefix, config, _control_headers(cluster))
        failure = Storage(cluster.storage_root).read_text(_failure_path(name))
        row.last_failure = json.loads(failure) if failure else None
        result.append(row)
    return url, result


def _control_headers(cluster: ClusterConfig) -> dict[str, str]:
    """What the control plane shows an app's status routes, which obey API keys: the cluster's
    own Ray token, which replicas accept there (never on predict)."""
    return ray_auth.headers(cluster)


def _model_states(
    url: str, prefix: str, config: dict[str, Any], headers: dict[str, str]
) -> list[dict[str, Any]]:
    pins = _pins(config)
    kind = MODEL_APPS[str(config["import_path"])]
    states = []
    for entry in (config.get("args") or {}).get("models", []):
        method, path = kind.call.format(name=entry["name"]).split(" ", 1)
        state: dict[str, Any] = {
            "name": entry["name"],
            "model": entry["model"],
            "pinned": pins.get(entry["name"]),
            "url": f"{method} {url}{prefix.rstrip('/')}{path}",
        }
        try:
            answer = httpx.get(
                kind.status_url(url, prefix, entry["name"]), headers=headers, timeout=5
            )
            state.update(answer.json())
        except (httpx.HTTPError, ValueError) as exc:
            state["error"] = f"not answering: {exc}"
        states.append(state)
    return states


def delete(cluster: ClusterConfig, name: str) -> None:
    """Delete one app, keeping the others.

    Raises:
        ConfigError: No app of that name.
    """
    with Dashboard(cluster.dashboard_url(), cluster.auth_mode) as dashboard:
        details = _details(dashboard)
        apps = _deployed_apps(details)
        if name not in apps:
            raise _unknown_app(name, list(apps))
        del apps[name]
        config = {
            "http_options": details.get("http_options"),
            "proxy_location": details.get("proxy_location"),
            "applications": list(apps.values()),
        }
        dashboard.put_serve(config)


def _unknown_app(name: str, names: list[str]) -> errors.ConfigError:
    return errors.ConfigError(
        f"no Serve app '{name}'" + (f" (apps: {', '.join(names)})" if names else " is running"),
        "See them with: aiaas serve status",
    )


def follow_alias(
    cluster: ClusterConfig, name: str, alias: str, version: str, timeout_s: float = 300
) -> list[str]:
    """Switch every model-server app that serves ``name@alias`` to ``version``, in place.

    When a replica cannot load the version, the apps go back to what they served and the alias
    moves back too, so registry and serving agree; the error says why.

    Returns:
        The apps switched (empty when none serves that alias or Serve is not running).
    """
    reference = f"{name}@{alias}"
    with Dashboard(cluster.dashboard_url(), cluster.auth_mode) as dashboard:
        try:
            details = _details(dashboard)
        except errors.ClusterError:
            return []
        apps = _deployed_apps(details)
        previous = copy.deepcopy(apps)
        changed: dict[str, list[str]] = {}
        chosen: registry.Version | str | None = None
        for app_name, app in apps.items():
            if app.get("import_path") not in MODEL_APPS:
                continue
            routes = [
                e["name"]
                for e in (app.get("args") or {}).get("models", [])
                if e["model"] == reference
            ]
            if routes:
                chosen = chosen or _whole_version(name, version, cluster.mlflow_url())
                _set_pins(app, {route: chosen for route in routes})
                changed[app_name] = routes
        if not changed:
            return []
        base = {
            "http_options": details.get("http_options"),
            "proxy_location": details.get("proxy_location"),
        }
        dashboard.put_serve({**base, "applications": list(apps.values())})
        url = serve_url(details)
        try:
            try:
                _wait(dashboard, list(changed), timeout_s)
            except _Broken as exc:
                # New replicas that cannot load the version fail to start and Serve gives up.
                raise errors.DeployError(
                    f"app '{exc.app}' could not load {', '.join(changed[exc.app])} "
                    f"version {version}: {exc.cause}",
                    exc.hint,
                ) from None
            _confirm(url, apps, changed, version, _control_headers(cluster))
        except errors.DeployError as exc:
            dashboard.put_serve({**base, "applications": list(previous.values())})
            for app_name in changed:
                record = {"at": time.time(), "model": f"{name}:{version}", "error": exc.message}
                Storage(cluster.storage_root).write_text(
                    _failure_path(app_name), json.dumps(record)
                )
            served_before = next(
                (
                    _pins(previous[app]).get(route)
                    for app, routes in changed.items()
                    for route in routes
                    if _pins(previous[app]).get(route)
                ),
                None,
            )
            uri = cluster.mlflow_url()
            if served_before and aliases.holder(name, alias, uri) == version:
                # Registry and serving agree again: the alias points where traffic goes.
                aliases.move_back(name, alias, served_before, uri)
            raise errors.DeployError(
                f"{exc.message}; the apps went back to the versions they served and "
                f"{reference} was rolled back",
                exc.hint,
            ) from None
    return list(changed)


def _whole_version(name: str, version: str, uri: str | None) -> registry.Version | str:
    """The version to pin with its record; just its number when the registry cannot say (the
    replicas then ask it themselves, as before records existed)."""
    try:
        return registry.resolve(registry.ModelRef(name, version=version), uri)
    except errors.AiaasError:
        return version


def _failure_path(app_name: str) -> str:
    return f"serve/apps/{app_name}/last_failed_switch.json"


def _confirm(
    url: str,
    apps: dict[str, Any],
    changed: dict[str, list[str]],
    version: str,
    headers: dict[str, str],
) -> None:
    """Every replica reached must serve the version (reconfigure keeps the old on failure)."""
    for app_name, routes in changed.items():
        prefix = str(apps[app_name].get("route_prefix") or "/")
        kind = MODEL_APPS[str(apps[app_name]["import_path"])]
        for route in routes:
            for _ in range(8):  # several asks reach several replicas
                answer = httpx.get(
                    kind.status_url(url, prefix, route), headers=headers, timeout=10
                ).json()
                failed = answer.get("failed_version")
                if failed:
                    raise errors.DeployError(
                        f"app '{app_name}' could not load {route} version {version}: "
                        f"{failed.get('error')}",
                        "Fix or re-register the version; the previous one kept serving.",
                    )


def rollback(cluster: ClusterConfig, app_name: str) -> list[str]:
    """Switch an app back to the versions it served before: every alias it follows moves back.

    Returns:
        Lines saying what moved.

    Raises:
        ConfigError: Unknown app, an app that pins versions, or nothing to roll back to.
    """
    with Dashboard(cluster.dashboard_url(), cluster.auth_mode) as dashboard:
        apps = _deployed_apps(_details(dashboard))
    if app_name not in apps:
        raise _unknown_app(app_name, list(apps))
    app = apps[app_name]
    if app.get("import_path") not in MODEL_APPS:
        raise errors.ConfigError(
            f"Serve app '{app_name}' serves no registered model; roll it back with its own config"
        )
    lines = []
    for entry in (app.get("args") or {}).get("models", []):
        ref = registry.parse_ref(entry["model"])
        if not ref.alias:
            raise errors.ConfigError(
                f"app '{app_name}' pins {entry['model']} for '{entry['name']}', so there is "
                "no earlier version to go back to",
                "Serve NAME@ALIAS to get rollbacks, or deploy the version you want.",
            )
        move = aliases.rollback(ref.name, ref.alias, cluster.mlflow_url())
        follow_alias(cluster, ref.name, ref.alias, move.to_version)
        lines.append(f"{ref}: {move.from_version} → {move.to_version}")
    return lines


def apps_serving(cluster: ClusterConfig, name: str, version: str) -> list[str]:
    """The apps (and model routes) whose pins say they serve ``name:version``."""
    try:
        with Dashboard(cluster.dashboard_url(), cluster.auth_mode, timeout_s=3) as dashboard:
            apps = _deployed_apps(_details(dashboard))
    except errors.ClusterError:
        return []
    found = []
    for app_name, app in apps.items():
        if app.get("import_path") not in MODEL_APPS:
            continue
        pins = _pins(app)
        for entry in (app.get("args") or {}).get("models", []):
            if (
                registry.parse_ref(entry["model"]).name == name
                and pins.get(entry["name"]) == version
            ):
                found.append(f"{app_name}/{entry['name']}")
    return found
