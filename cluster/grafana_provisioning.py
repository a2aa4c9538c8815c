"""Put dashboards into a Grafana: through its HTTP API (grafana-client), or as files for
Grafana's file provisioning.

The API path is idempotent: folders are found by uid before being created, and a dashboard is
sent only when its content differs from what Grafana holds (``POST /api/dashboards/db`` with
``overwrite``, which creates or updates in place under the same uid).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from aiaas import errors

#: Keys Grafana adds or bumps on every save; they are not content.
_VOLATILE = ("id", "version", "iteration")


@dataclass(frozen=True)
class Folder:
    uid: str
    title: str
    dashboards: list[dict[str, Any]]


@dataclass(frozen=True)
class Outcome:
    uid: str
    title: str
    folder: str
    action: str  # created, updated or unchanged


def ray_dashboards(head_temp_dir: str) -> list[dict[str, Any]]:
    """The dashboards Ray generated for this cluster's session (Serve, Train, Data, ...)."""
    found = sorted(Path(head_temp_dir).glob("session_latest/metrics/grafana/dashboards/*.json"))
    return [json.loads(path.read_text()) for path in found]


def content(board: dict[str, Any]) -> dict[str, Any]:
    """A dashboard without the keys Grafana changes on save, for comparison."""
    return {key: value for key, value in board.items() if key not in _VOLATILE}


def upload(
    url: str, token: str | None, folders: list[Folder], datasource: tuple[str, str] | None = None
) -> list[Outcome]:
    """Create or update every folder's dashboards in the Grafana at ``url``.

    Args:
        token: A service-account token (Bearer); None uses credentials in the URL, if any.
        datasource: (name, Prometheus URL) to create when Grafana has no Prometheus data source.

    Raises:
        ClusterError: Grafana is unreachable or refused a request (status and its message).
    """
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaException

    api = GrafanaApi.from_url(url, credential=token, timeout=15)
    outcomes = []
    try:
        api.health.check()
        if datasource is not None:
            _ensure_datasource(api, *datasource)
        for folder in folders:
            _ensure_folder(api, folder)
            for board in folder.dashboards:
                outcomes.append(_put(api, folder, board))
    except GrafanaException as exc:
        raise errors.ClusterError(
            f"Grafana at {url} answered {exc.status_code}: {exc.message}",
            "Check the URL and that the token (a service-account token with the Editor role) "
            "is in the environment variable named by dashboards.token_env.",
        ) from None
    except Exception as exc:  # niquests' connection errors have no common base we can name
        raise errors.ClusterError(
            f"cannot reach Grafana at {url}: {exc}", "Is Grafana running at that address?"
        ) from None
    return outcomes


def _ensure_datasource(api: Any, name: str, prometheus_url: str) -> None:
    existing = api.datasource.list_datasources()
    if any(source.get("type") == "prometheus" for source in existing):
        return
    api.datasource.create_datasource(
        {"name": name, "type": "prometheus", "access": "proxy", "url": prometheus_url}
    )


def _ensure_folder(api: Any, folder: Folder) -> None:
    from grafana_client.client import GrafanaClientError

    try:
        api.folder.get_folder(folder.uid)
    except GrafanaClientError as exc:
        if exc.status_code != 404:
            raise
        api.folder.create_folder(folder.title, uid=folder.uid)


def _put(api: Any, folder: Folder, board: dict[str, Any]) -> Outcome:
    from grafana_client.client import GrafanaClientError

    uid, title = str(board["uid"]), str(board.get("title", board["uid"]))
    try:
        held = api.dashboard.get_dashboard(uid)
    except GrafanaClientError as exc:
        if exc.status_code != 404:
            raise
        held = None
    if held is not None:
        same_folder = (held.get("meta") or {}).get("folderUid") == folder.uid
        if same_folder and content(held["dashboard"]) == content(board):
            return Outcome(uid, title, folder.title, "unchanged")
    api.dashboard.update_dashboard(
        {
            "dashboard": {**content(board), "id": None},
            "folderUid": folder.uid,
            "overwrite": True,
            "message": "provisioned by aiaas monitor dashboards",
        }
    )
    return Outcome(uid, title, folder.title, "updated" if held is not None else "created")


def write_files(directory: Path, folders: list[Folder], datasource: tuple[str, str]) -> list[Path]:
    """Dashboards as JSON, one directory per folder, plus the provisioning files that load them
    (``provisioning/dashboards/aiaas.yml``, ``provisioning/datasources/aiaas.yml``).

    Point Grafana's ``paths.provisioning`` at ``directory/provisioning``.
    """
    written = []
    providers = []
    for folder in folders:
        where = directory / "dashboards" / folder.uid
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir(parents=True)
        for board in folder.dashboards:
            path = where / f"{board['uid']}.json"
            path.write_text(json.dumps(board, indent=2, sort_keys=True) + "\n")
            written.append(path)
        providers.append(
            {
                "name": folder.uid,
                "folder": folder.title,
                "folderUid": folder.uid,
                "type": "file",
                "disableDeletion": False,
                "allowUiUpdates": False,
                "options": {"path": str(where.resolve())},
            }
        )
    name, prometheus_url = datasource
    files = {
        "dashboards": {"apiVersion": 1, "providers": providers},
        "datasources": {
            "apiVersion": 1,
            "datasources": [
                {
                    "name": name,
                    "type": "prometheus",
                    "access": "proxy",
                    "url": prometheus_url,
                    "isDefault": True,
                }
            ],
        },
    }
    for kind, body in files.items():
        path = directory / "provisioning" / kind / "aiaas.yml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(body, sort_keys=False))
        written.append(path)
    return written
