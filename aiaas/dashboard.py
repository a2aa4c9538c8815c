"""Read the cluster's state from Ray's own dashboard REST API (nodes, jobs, Serve apps).

Plain HTTP rather than ``ray.init``: status must not join the cluster as a driver, and it must
answer quickly even when the cluster is half up.
"""

from __future__ import annotations

from typing import Any

import httpx

from aiaas import errors, ray_auth


def _headers(auth_mode: str) -> dict[str, str]:
    if auth_mode != "token":
        return {}
    # The CLI names the cluster's token file (ray_auth.use); processes on the cluster inherit it.
    token = ray_auth.token_from_env()
    return {"Authorization": f"Bearer {token}"} if token else {}


class Dashboard:
    """A client of one cluster's dashboard.

    Args:
        url: e.g. ``http://127.0.0.1:8265``.
        auth_mode: The cluster's RAY_AUTH_MODE; with ``token`` the Ray token is sent.
    """

    def __init__(self, url: str, auth_mode: str = "disabled", timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.Client(timeout=timeout_s, headers=_headers(auth_mode), trust_env=False)

    def close(self) -> None:
        """Release the HTTP connection pool."""
        self._client.close()

    def __enter__(self) -> Dashboard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reachable(self) -> bool:
        """True when the dashboard answers."""
        try:
            return self._client.get(f"{self.url}/api/version").status_code == 200
        except httpx.HTTPError:
            return False

    def nodes(self) -> list[dict[str, Any]]:
        """Every node Ray knows, alive or dead (state API ``/api/v0/nodes``)."""
        body = self._get("/api/v0/nodes", params={"limit": 10000, "detail": "true"})
        return list(body["data"]["result"]["result"])

    def jobs(self) -> list[dict[str, Any]]:
        """Every job the Jobs API knows."""
        return list(self._get("/api/jobs/"))

    def serve_applications(self) -> dict[str, Any]:
        """Serve applications by name; empty when Serve is not running."""
        try:
            body = self._get("/api/serve/applications/")
        except errors.ClusterError:
            return {}
        return dict(body.get("applications") or {})

    def serve_details(self) -> dict[str, Any]:
        """Serve's whole state (``GET /api/serve/applications/``): apps, their deployed
        configs, deployments and replicas, HTTP options."""
        return dict(self._get("/api/serve/applications/"))

    def put_serve(self, config: dict[str, Any]) -> None:
        """Deploy a complete Serve config (every app; apps left out are deleted)."""
        try:
            response = self._client.put(f"{self.url}/api/serve/applications/", json=config)
        except httpx.HTTPError as exc:
            raise errors.ClusterError(
                f"the Ray dashboard at {self.url} did not take the Serve config: {exc}",
                "Is the cluster up? Run 'aiaas cluster status'.",
            ) from None
        _refused(response, self.url)
        if response.status_code != 200:
            why = errors.without_traceback(response.text)[-1500:]
            raise errors.ClusterError(
                f"Serve rejected the config (HTTP {response.status_code}): {why}"
            )

    def _get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        try:
            response = self._client.get(f"{self.url}{path}", params=params)
        except httpx.HTTPError as exc:
            raise errors.ClusterError(
                f"the Ray dashboard at {self.url} did not answer {path}: {exc}",
                "Is the cluster up? Run 'aiaas cluster status'.",
            ) from None
        _refused(response, self.url)
        if response.status_code != 200:
            raise errors.ClusterError(
                f"the Ray dashboard at {self.url} answered {path} with HTTP "
                f"{response.status_code}: {response.text[:300]}"
            )
        return response.json()


def _refused(response: httpx.Response, url: str) -> None:
    if response.status_code in (401, 403):
        raise errors.ClusterError(
            f"the Ray dashboard at {url} refused the request (HTTP {response.status_code}: "
            f"{response.text[:120]}): the cluster uses token auth and this process has no valid "
            "token for it",
            "Pass the cluster's config with --cluster (aiaas reads its token from the storage "
            "root), or check auth_mode in that config.",
        )
