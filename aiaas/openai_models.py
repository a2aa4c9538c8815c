"""``GET /v1/models`` across apps: every model of every OpenAI-style app on the cluster.

Serve routes a path to the app with the longest matching route prefix, so whichever app owns
``/v1/models`` (the model server at ``/v1/models``, else the LLM app at ``/v1``) answers for all
of them. It finds the others in Serve's status (deployments named in
:data:`aiaas.serving.apps.OPENAI_DEPLOYMENTS`) and asks each, by deployment handle, for its
``openai_models()``. Answers are kept a couple of seconds: a client listing models in a loop
must not turn each call into a round of handle calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiaas.serving import apps

logger = logging.getLogger("ray.serve")
CACHE_S = 2.0
CALL_TIMEOUT_S = 5.0


class Catalogue:
    """One replica's view of the cluster's OpenAI-style models."""

    def __init__(self) -> None:
        self._cached: list[dict[str, Any]] = []
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def models(self, own: list[dict[str, Any]], own_deployment: str | None) -> list[dict]:
        """``own`` (this app's models, always fresh) and the other apps' models."""
        async with self._lock:
            if time.monotonic() - self._at > CACHE_S:
                self._cached = await self._others(own_deployment)
                self._at = time.monotonic()
        seen = {model["id"] for model in own}
        return own + [model for model in self._cached if model["id"] not in seen]

    @staticmethod
    async def _others(own_deployment: str | None) -> list[dict[str, Any]]:
        from ray import serve

        try:
            own_app = serve.get_replica_context().app_name
        except Exception:  # not in a replica (a plain test of the class): no other apps
            return []
        try:
            status = await asyncio.to_thread(serve.status)
        except Exception as exc:  # the controller is busy or restarting: list what we have
            logger.warning("listing the other apps' models: %s", exc)
            return []
        found: list[dict[str, Any]] = []
        for app_name, app in status.applications.items():
            for deployment in app.deployments:
                if deployment not in apps.OPENAI_DEPLOYMENTS:
                    continue
                if app_name == own_app and deployment == own_deployment:
                    continue
                handle = serve.get_deployment_handle(deployment, app_name)
                try:
                    found += await asyncio.wait_for(handle.openai_models.remote(), CALL_TIMEOUT_S)
                except Exception as exc:  # an app still starting: listed next time
                    logger.info("app %s did not list its models: %s", app_name, exc)
        return found
