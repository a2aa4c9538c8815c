"""What aiaas's processes on a cluster read from their environment: one typed object, read once.

``aiaas cluster up`` (``cluster/environment.py``) writes these variables into every node's
environment, so jobs, replicas and actors inherit them; ``jobs/submit.py`` adds the per-job
ones. The names live here, once, for both sides (as Ray Serve's ``_private/constants.py`` owns
its ``RAY_SERVE_*`` names). Standard library only: a replica's start must stay light.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from functools import cache

from aiaas import errors

STORAGE_ROOT = "AIAAS_STORAGE_ROOT"
CLUSTER_NAME = "AIAAS_CLUSTER_NAME"
MODEL_CACHE = "AIAAS_MODEL_CACHE"
SUBMISSION_ID = "AIAAS_SUBMISSION_ID"
GIT_COMMIT = "AIAAS_GIT_COMMIT"
USER = "AIAAS_USER"
DEBUG = "AIAAS_DEBUG"
HAPROXY_ACCESS_LOG = "AIAAS_HAPROXY_ACCESS_LOG"
HAPROXY_HTTP_REQUEST_TIMEOUT_S = "AIAAS_HAPROXY_HTTP_REQUEST_TIMEOUT_S"


@dataclass(frozen=True)
class Settings:
    """The environment of one process, as aiaas reads it."""

    #: The cluster's storage root; None outside an aiaas cluster.
    storage_root: str | None
    cluster_name: str | None
    #: Where replicas and jobs keep downloaded artifacts (the cluster's temp dir on nodes).
    model_cache: str
    #: The aiaas job id of a job submitted by aiaas (Ray's own id otherwise).
    submission_id: str | None
    git_commit: str | None
    #: Who moves aliases, as alias history records it.
    user: str | None
    #: Show tracebacks instead of ``Error: ...``.
    debug: bool
    #: aiaas-haproxy: keep HAProxy's per-request access log (the cluster config names a target).
    haproxy_access_log: bool
    #: aiaas-haproxy: HAProxy's ``timeout http-request`` in whole seconds (body included).
    haproxy_http_request_timeout_s: str | None

    def require_storage_root(self) -> str:
        """The storage root, or a ClusterError saying the process runs outside a cluster.

        Raises:
            ClusterError: The variable is not set.
        """
        if not self.storage_root:
            raise errors.ClusterError(
                f"{STORAGE_ROOT} is not set on this node",
                "Run the job on a cluster started with 'aiaas cluster up' (it sets the storage "
                "root).",
            )
        return self.storage_root


@cache
def current() -> Settings:
    """This process's settings, read the first time they are asked for."""
    env = os.environ
    return Settings(
        storage_root=env.get(STORAGE_ROOT) or None,
        cluster_name=env.get(CLUSTER_NAME) or None,
        model_cache=env.get(MODEL_CACHE) or f"{tempfile.gettempdir()}/aiaas-models",
        submission_id=env.get(SUBMISSION_ID) or None,
        git_commit=env.get(GIT_COMMIT) or None,
        user=env.get(USER) or None,
        debug=env.get(DEBUG) == "1",
        haproxy_access_log=env.get(HAPROXY_ACCESS_LOG, "1") != "0",
        haproxy_http_request_timeout_s=env.get(HAPROXY_HTTP_REQUEST_TIMEOUT_S) or None,
    )
