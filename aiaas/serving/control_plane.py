"""Serve on one cluster, as its dashboard's declarative REST API shows it, in Serve's own types.

State is ``GET /api/serve/applications/`` read as a ``ServeInstanceDetails`` (what Ray's
``serve status`` reads); a change is a whole ``ServeDeploySchema`` sent with
``PUT /api/serve/applications/``, the same path ``serve deploy`` takes (so an app deployed
either way is managed either way). Both go through :class:`aiaas.dashboard.Dashboard`; the
apps' own status routes, which obey API keys, are asked with the cluster's Ray token.

Ray's schema module imports Ray, so it is imported inside methods: ``aiaas --help`` never
loads Ray.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import ValidationError

from aiaas import errors, ray_auth
from aiaas.dashboard import Dashboard
from aiaas.serving import applied, edit_lock
from aiaas.storage import Storage

if TYPE_CHECKING:
    from ray.serve.schema import (
        ApplicationDetails,
        ServeApplicationSchema,
        ServeDeploySchema,
        ServeInstanceDetails,
    )

    from aiaas.config.cluster import ClusterConfig

HEALTHY = "RUNNING"
BROKEN = ("DEPLOY_FAILED", "UNHEALTHY")
#: Serve may still report the old state for a moment after a PUT.
SETTLE_S = 1.0
POLL_S = 0.5


class Broken(errors.DeployError):
    """An app Serve gave up on (its replicas failed to start or went unhealthy)."""

    def __init__(self, app: str, state: str, cause: str) -> None:
        super().__init__(
            f"Serve app '{app}' is {state}: {cause}",
            "The previous config was put back; fix the cause and deploy again.",
        )
        self.app, self.cause = app, cause


class ControlPlane:
    """Serve's state and changes on one cluster, typed.

    Args:
        dashboard: The cluster's dashboard client (the one client of its REST API).
        status_headers: What the apps' status routes are shown (the cluster's Ray token,
            which replicas accept there, never on predict); asked when first needed.
    """

    def __init__(
        self,
        dashboard: Dashboard,
        status_headers: Callable[[], dict[str, str]],
        record: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.dashboard = dashboard
        self._status_headers = status_headers
        self._record = record
        self._apps: httpx.Client | None = None

    def close(self) -> None:
        """Release the connections to the apps (the dashboard client is the caller's)."""
        if self._apps is not None:
            self._apps.close()

    @classmethod
    @contextmanager
    def of(cls, cluster: ClusterConfig, timeout_s: float = 10.0) -> Iterator[ControlPlane]:
        """The control plane of ``cluster``, its connections closed on exit."""
        with Dashboard(cluster.dashboard_url(), cluster.auth_mode, timeout_s) as dashboard:
            plane = cls(
                dashboard,
                lambda: ray_auth.headers(cluster),
                lambda body: applied.save(Storage(cluster.storage_root), cluster.name, body),
            )
            try:
                yield plane
            finally:
                plane.close()

    @classmethod
    @contextmanager
    def editing(cls, cluster: ClusterConfig, timeout_s: float = 10.0) -> Iterator[ControlPlane]:
        """The control plane of ``cluster`` for a read-modify-write of Serve's config, holding
        the cluster's edit lock (:mod:`aiaas.serving.edit_lock`) throughout."""
        with edit_lock.held(cluster), cls.of(cluster, timeout_s) as plane:
            yield plane

    def details(self) -> ServeInstanceDetails:
        """Serve's whole state; no apps when the dashboard answers but Serve has not started.

        Raises:
            ClusterError: The dashboard does not answer, or answers in a shape this Ray's
                ``ServeInstanceDetails`` does not take.
        """
        from ray.serve.schema import ServeInstanceDetails

        try:
            body = self.dashboard.serve_details()
        except errors.ClusterError:
            if not self.dashboard.reachable():
                raise
            body = ServeInstanceDetails.get_empty_schema_dict()
        try:
            return ServeInstanceDetails.model_validate(body)
        except ValidationError as exc:
            raise errors.ClusterError(
                f"the Ray dashboard at {self.dashboard.url} described Serve in a shape this "
                f"Ray's ServeInstanceDetails does not take: {exc}",
                "Use the same Ray version as the cluster.",
            ) from None

    def put(self, config: ServeDeploySchema) -> None:
        """Deploy a complete Serve config (every app; apps left out are deleted), sent as Ray's
        ``serve deploy`` sends it: only the fields that were set."""
        body = config.model_dump(mode="json", exclude_unset=True)
        self.dashboard.put_serve(body)
        if self._record is not None:
            # What Serve was last told: put back by the supervisor if a restarted head lost it.
            self._record(body)

    def wait_gone(self, name: str, timeout_s: float) -> None:
        """Wait until Serve has let the app go (its replicas stopped, its CPUs free again).

        Raises:
            DeployError: It is still there after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while name in self.details().applications:
            if time.monotonic() > deadline:
                raise errors.DeployError(
                    f"Serve app '{name}' is still being deleted after {timeout_s:.0f}s",
                    "See 'aiaas serve status'; Serve finishes deleting it by itself.",
                )
            time.sleep(POLL_S)

    def wait_healthy(self, names: list[str], timeout_s: float) -> None:
        """Wait until the apps ``names`` and all their deployments are healthy.

        Raises:
            Broken: Serve gave up on one. DeployError: not healthy within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        time.sleep(SETTLE_S)
        while True:
            apps = self.details().applications
            states = {name: apps.get(name) for name in names}
            for name, app in states.items():
                if app is not None and app.status.value in BROKEN:
                    raise Broken(name, app.status.value, told(app))
            if all(app is not None and healthy(app) for app in states.values()):
                return
            if time.monotonic() > deadline:
                waiting = {n: a.status.value if a else "absent" for n, a in states.items()}
                raise errors.DeployError(
                    f"Serve apps not ready after {timeout_s:.0f}s: {waiting}",
                    "See 'aiaas serve status' and the Serve logs in the Ray dashboard.",
                )
            time.sleep(POLL_S)

    def model_status(self, url: str, timeout_s: float = 10) -> dict[str, Any]:
        """What a model's status route answers (``version``, ``failed_version``, ...).

        Raises:
            httpx.HTTPError: No answer. ValueError: An answer that is not JSON.
        """
        if self._apps is None:
            self._apps = httpx.Client(headers=self._status_headers(), trust_env=False)
        answer: dict[str, Any] = self._apps.get(url, timeout=timeout_s).json()
        return answer


def deployed(details: ServeInstanceDetails) -> dict[str, ServeApplicationSchema]:
    """The config each running app was deployed with, by app name."""
    return {
        name: app.deployed_app_config
        for name, app in details.applications.items()
        if app.deployed_app_config is not None
    }


def config(
    details: ServeInstanceDetails, applications: list[ServeApplicationSchema]
) -> ServeDeploySchema:
    """A whole Serve config of ``applications`` under Serve's current HTTP options."""
    from ray.serve.schema import ServeDeploySchema

    fields: dict[str, Any] = {"applications": applications}
    if details.http_options is not None:
        fields["http_options"] = details.http_options
    if details.proxy_location is not None:
        fields["proxy_location"] = details.proxy_location
    return ServeDeploySchema(**fields)


def serve_url(details: ServeInstanceDetails) -> str:
    """The HTTP address Serve's proxy listens on."""
    options = details.http_options
    host = (options.host if options else None) or "127.0.0.1"
    return f"http://{host}:{(options.port if options else None) or 8000}"


def healthy(app: ApplicationDetails) -> bool:
    """Serve runs the app and every deployment of it is healthy."""
    return app.status.value == HEALTHY and all(
        d.status.value == "HEALTHY" for d in app.deployments.values()
    )


def told(app: ApplicationDetails) -> str:
    """Why an app is in its state, in the words of its and its deployments' messages."""
    return said([app.message] + [d.message for d in app.deployments.values()])


def said(messages: list[str]) -> str:
    """Messages as one line each without their tracebacks' frames, cut to the last 1500."""
    text = " ".join(errors.without_traceback(m) for m in messages if m and m.strip())
    return text[-1500:] or "(no message)"


def unknown_app(name: str, names: list[str]) -> errors.ConfigError:
    """The error for an app name Serve does not run."""
    return errors.ConfigError(
        f"no Serve app '{name}'" + (f" (apps: {', '.join(names)})" if names else " is running"),
        "See them with: aiaas serve status",
    )
