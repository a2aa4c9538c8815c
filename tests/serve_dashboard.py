"""A Ray dashboard's Serve REST API double, with the apps' model status routes behind it, for
unit tests of the control plane (no Ray starts).

``PUT /api/serve/applications/`` takes a whole config (checked with Ray's
``ServeDeploySchema``, 400 otherwise) and "applies" it at once; ``GET`` answers Serve's state
as the controller shapes it (a ``ServeInstanceDetails`` dumped with ``exclude_unset``). The
proxy's address in ``http_options`` is this server, so ``GET {route_prefix}/{model}`` (and
``/embeddings/{model}``) answer as our apps' status routes do. A pinned version in ``broken``
fails to load in place (the old one keeps serving, ``failed_version`` says why); one in
``failing`` makes the app ``DEPLOY_FAILED``. Requests without the token get 401.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from aiaas.serving import apps, pins
from tests import http_double


@dataclass
class ServeDouble:
    token: str | None = None
    broken: dict[str, str] = field(default_factory=dict)  # version → load error
    failing: dict[str, str] = field(default_factory=dict)  # version → deployment message
    puts: list[dict[str, Any]] = field(default_factory=list)
    status_asks: list[tuple[str, str | None]] = field(default_factory=list)  # path, auth
    applications: list[dict[str, Any]] = field(default_factory=list)
    served: dict[tuple[str, str], str] = field(default_factory=dict)
    failed: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    states: dict[str, tuple[str, str]] = field(default_factory=dict)  # app → status, message

    def __post_init__(self) -> None:
        self._http = http_double.JsonServer(self._handle)
        self.port = self._http.port
        self.url = self._http.url

    def close(self) -> None:
        self._http.close()

    def apply(self, config: dict[str, Any]) -> None:
        """What Serve does with a config: apps left out go, pinned versions load (or not)."""
        self.applications = list(config.get("applications") or [])
        for app in self.applications:
            kind = apps.MODEL_APPS.get(app["import_path"])
            self.states[app["name"]] = ("RUNNING", "")
            if kind is None:
                continue
            entry = next(
                (d for d in app.get("deployments") or [] if d["name"] == kind.deployment), {}
            )
            for route, version in pins.Pins.read(entry.get("user_config")).versions.items():
                key = (app["name"], route)
                if version in self.failing:
                    self.states[app["name"]] = ("DEPLOY_FAILED", self.failing[version])
                elif version in self.broken:
                    self.failed[key] = {"version": version, "error": self.broken[version]}
                else:
                    self.served[key] = version
                    self.failed.pop(key, None)

    def details(self) -> dict[str, Any]:
        from ray.serve.schema import ServeInstanceDetails

        if not self.applications:
            return ServeInstanceDetails.get_empty_schema_dict()
        found = {
            "controller_info": {},
            "proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": self.port},
            "proxies": {},
            "applications": {app["name"]: self._app(app) for app in self.applications},
        }
        typed = ServeInstanceDetails.model_validate(found)
        body: dict[str, Any] = typed._get_user_facing_json_serializable_dict(exclude_unset=True)
        return body

    def _app(self, app: dict[str, Any]) -> dict[str, Any]:
        kind = apps.MODEL_APPS.get(app["import_path"])
        status, message = self.states[app["name"]]
        deployment = kind.deployment if kind else "App"
        return {
            "name": app["name"],
            "route_prefix": app.get("route_prefix", "/"),
            "docs_path": None,
            "status": status,
            "message": message,
            "last_deployed_time_s": 0.0,
            "deployed_app_config": app,
            "source": "declarative",
            "external_scaler_enabled": False,
            "deployments": {
                deployment: {
                    "name": deployment,
                    "status": "HEALTHY" if status == "RUNNING" else "UNHEALTHY",
                    "status_trigger": "CONFIG_UPDATE_COMPLETED",
                    "message": message,
                    "deployment_config": {"name": deployment},
                    "target_num_replicas": 1,
                    "required_resources": {},
                    "replicas": [{"replica_id": "r1", "state": "RUNNING", "start_time_s": 0.0}],
                }
            },
        }

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        path = handler.path.split("?")[0]
        auth = handler.headers.get("Authorization")
        if self.token and auth != f"Bearer {self.token}":
            return http_double.send(handler, 401, {"error": "no token"})
        if path == "/api/version":
            return http_double.send(handler, 200, {"ray_version": "2.60.0"})
        if path == "/api/serve/applications/" and method == "GET":
            return http_double.send(handler, 200, self.details())
        if path == "/api/serve/applications/" and method == "PUT":
            from pydantic import ValidationError
            from ray.serve.schema import ServeDeploySchema

            body = http_double.read_json(handler)
            try:
                ServeDeploySchema.model_validate(body)
            except ValidationError as exc:
                return http_double.send(handler, 400, {"error": str(exc)})
            self.puts.append(body)
            self.apply(body)
            return http_double.send(handler, 200, {})
        self.status_asks.append((path, auth))
        return self._model_status(handler, path)

    def _model_status(self, handler: BaseHTTPRequestHandler, path: str) -> None:
        for app in self.applications:
            prefix = app.get("route_prefix", "/").rstrip("/")
            if not path.startswith(prefix + "/"):
                continue
            route = path[len(prefix) + 1 :].removeprefix("embeddings/")
            model = next((m["model"] for m in app["args"]["models"] if m["name"] == route), None)
            if model is None:
                continue
            key = (app["name"], route)
            answer: dict[str, Any] = {
                "name": route,
                "model": model,
                "ready": key in self.served,
                "version": self.served.get(key),
                "format": "onnx",
            }
            if key in self.failed:
                answer["failed_version"] = self.failed[key]
            return http_double.send(handler, 200, answer)
        return http_double.send(handler, 404, {"error": f"no route {path}"})
