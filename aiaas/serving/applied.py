"""The Serve config last applied to a cluster, kept under the storage root.

With GCS fault tolerance a restarted head finds Serve's apps in Redis by itself; this record is
what puts them back at their pinned versions when it does not (Redis's data lost, or a cluster
without fault tolerance brought up again by its supervisor).
"""

from __future__ import annotations

import json
from typing import Any

from aiaas.storage import Storage


def _path(cluster_name: str) -> str:
    return f"clusters/{cluster_name}/serve_applied.json"


def save(storage: Storage, cluster_name: str, body: dict[str, Any]) -> None:
    """Record a whole Serve config as it was sent."""
    storage.write_text(_path(cluster_name), json.dumps(body, indent=2, sort_keys=True))


def load(storage: Storage, cluster_name: str) -> dict[str, Any] | None:
    """The last applied config, or None (never applied, or a damaged file)."""
    text = storage.read_text(_path(cluster_name))
    if text is None:
        return None
    try:
        body = json.loads(text)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None
