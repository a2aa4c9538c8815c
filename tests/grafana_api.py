"""A Grafana HTTP API double for contract tests: the documented request paths and bodies of the
endpoints aiaas provisions through (no Grafana server package installs here).

It answers as Grafana's HTTP API reference documents (folder, dashboard and data source APIs):
404 for unknown uids, 412 ``version-mismatch`` when a dashboard with the uid exists and
``overwrite`` is false, 400 for bodies that lack what Grafana requires, 401 without the token.
Every request is recorded so tests can check what was sent, and how often.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests import http_double


@dataclass
class GrafanaDouble:
    token: str
    requests: list[tuple[str, str, Any]] = field(default_factory=list)
    folders: dict[str, dict[str, Any]] = field(default_factory=dict)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)
    datasources: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._http = http_double.JsonServer(self._handle)
        self.port = self._http.port
        self.url = self._http.url

    def close(self) -> None:
        self._http.close()

    def calls(self, method: str, path: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == method and p == path)

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        body = http_double.read_json(handler)
        path = handler.path.split("?")[0]
        self.requests.append((method, path, body))
        if handler.headers.get("Authorization") != f"Bearer {self.token}":
            return http_double.send(handler, 401, {"message": "Unauthorized"})
        status, answer = self._route(method, path, body)
        http_double.send(handler, status, answer)

    def _route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        if (method, path) == ("GET", "/api/frontend/settings"):
            return 200, {"buildInfo": {"version": "12.0.0"}}
        if (method, path) == ("GET", "/api/datasources"):
            return 200, self.datasources
        if (method, path) == ("POST", "/api/datasources"):
            missing = [key for key in ("name", "type", "access") if key not in body]
            if missing:
                return 400, {"message": f"missing {missing}"}
            self.datasources.append({**body, "id": len(self.datasources) + 1})
            return 200, {"message": "Datasource added", "id": len(self.datasources)}
        if method == "GET" and parts[:2] == ["api", "folders"] and len(parts) == 3:
            folder = self.folders.get(parts[2])
            return (200, folder) if folder else (404, {"message": "folder not found"})
        if (method, path) == ("POST", "/api/folders"):
            if not body.get("title"):
                return 400, {"message": "folder title cannot be empty"}
            uid = body.get("uid") or f"generated-{len(self.folders)}"
            if uid in self.folders:
                return 409, {"message": "a folder with the same uid already exists"}
            self.folders[uid] = {"uid": uid, "title": body["title"], "id": len(self.folders) + 1}
            return 200, self.folders[uid]
        if method == "GET" and parts[:3] == ["api", "dashboards", "uid"] and len(parts) == 4:
            held = self.dashboards.get(parts[3])
            if held is None:
                return 404, {"message": "Dashboard not found"}
            return 200, {"dashboard": held["dashboard"], "meta": {"folderUid": held["folderUid"]}}
        if (method, path) == ("POST", "/api/dashboards/db"):
            return self._save_dashboard(body)
        return 404, {"message": "Not found"}

    def _save_dashboard(self, body: Any) -> tuple[int, Any]:
        board = body.get("dashboard") if isinstance(body, dict) else None
        if not isinstance(board, dict) or not board.get("title"):
            return 400, {"message": "Dashboard title cannot be empty"}
        uid = board.get("uid")
        if not uid:
            return 400, {"message": "aiaas always sends a uid"}
        folder_uid = body.get("folderUid")
        if folder_uid is not None and folder_uid not in self.folders:
            return 400, {"message": "folder not found"}
        held = self.dashboards.get(uid)
        if held is not None and not body.get("overwrite"):
            return 412, {"status": "version-mismatch", "message": "dashboard has been changed"}
        if board.get("id") not in (None, held and held["dashboard"]["id"]):
            self.problems.append(f"{uid}: sent a foreign id {board.get('id')}")
        version = (held["dashboard"]["version"] + 1) if held else 1
        number = held["dashboard"]["id"] if held else len(self.dashboards) + 1
        stored = {**board, "id": number, "version": version}
        self.dashboards[uid] = {"dashboard": stored, "folderUid": folder_uid}
        return 200, {"id": number, "uid": uid, "status": "success", "version": version}
