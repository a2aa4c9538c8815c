"""After a head restart: put Serve's apps back from the last applied config if the restarted
GCS came back without them.

With GCS fault tolerance the Serve controller (a detached actor) is restarted by the GCS and
reads its own checkpoint from Redis, so the apps are back within seconds and nothing is done
here. Only when they stay absent (Redis lost its data) is the recorded config sent again.
"""

from __future__ import annotations

import time

from aiaas import errors
from aiaas.config.cluster import ClusterConfig
from aiaas.serving import applied
from aiaas.serving.control_plane import ControlPlane
from aiaas.storage import Storage

#: How long the restarted controller gets to recover the apps by itself.
RECOVERY_S = 60.0


def restore(config: ClusterConfig, recovery_s: float = RECOVERY_S) -> list[str]:
    """The apps put back (none when Serve recovered them or none were applied)."""
    recorded = applied.load(Storage(config.storage_root), config.name)
    wanted = [app["name"] for app in (recorded or {}).get("applications", [])]
    if not wanted:
        return []
    deadline = time.monotonic() + recovery_s
    with ControlPlane.editing(config) as plane:
        while time.monotonic() < deadline:
            try:
                if plane.details().applications:
                    return []
            except errors.ClusterError:
                pass  # the dashboard is still coming up
            time.sleep(1)
        assert recorded is not None
        plane.dashboard.put_serve(recorded)
    return wanted
