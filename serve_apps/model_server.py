"""The model server: registered versions behind the KServe / TF-Serving V1 API on Ray Serve.

``import_path: serve_apps.model_server:build_app`` with ``route_prefix: /v1/models``:

- ``POST /v1/models/{name}:predict`` with ``{"instances": [...]}`` →
  ``{"predictions": [...], "model": name, "version": "N"}``
- ``GET /v1/models/{name}`` → readiness and the version being served (and a failed switch)
- ``GET /v1/models`` → every model this app serves

Each replica loads its versions once; ``user_config: {versions: {name: N}}`` pins versions and a
change is applied in place by ``reconfigure``: the new version loads beside the old one, which
keeps answering until the swap, so promote and rollback drop no request. A version that fails to
load never takes traffic; the error is reported on ``GET /v1/models/{name}``.
"""

# No `from __future__ import annotations`: Serve reads build_app's annotation to build Args.

import asyncio
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from aiaas import api_keys, artifacts, registry, serve_http
from aiaas import metrics as aiaas_metrics
from aiaas.storage import Storage

logger = logging.getLogger("ray.serve")


class Args(BaseModel):
    """The app's arguments (the ``args:`` of its entry in a Serve config file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[serve_http.ServedModel] = Field(min_length=1, description="the models served")
    max_batch_size: int = Field(32, ge=1, le=1024, description="rows of requests per batch")
    batch_wait_timeout_s: float = Field(
        0.002, ge=0, le=1, description="longest wait for a batch to fill"
    )
    max_instances: int = Field(1024, ge=1, description="instances per request (more: 413)")
    max_payload_bytes: int = Field(1_048_576, ge=1024, description="request body limit (413)")
    max_pending: int = Field(
        256, ge=1, description="requests waiting in one replica before it answers 503"
    )
    request_timeout_s: float = Field(10.0, gt=0, description="per-request limit (504)")
    api_keys_file: str | None = Field(
        None,
        description="key file under the storage root (aiaas serve keys create); when set, "
        "every predict call needs 'Authorization: Bearer <key>'",
    )
    threads: int = Field(1, ge=1, le=64, description="intra-op threads per replica")


app = FastAPI(title="aiaas model server", docs_url=None, redoc_url=None)
serve_http.install_error_handlers(app)


@dataclass
class Loaded:
    """A version loaded in this replica."""

    version: str
    predictor: artifacts.Predictor
    features: int
    loaded_at: float


@serve.deployment(name="ModelServer", max_ongoing_requests=64)
@serve.ingress(app)
class ModelServer:
    """Serves every model of :class:`Args` from one replica, with batching across requests."""

    def __init__(self, args: Args) -> None:
        self.args = args
        self.pending = 0
        self.slots = serve_http.Slots(args.models, self._load, serve_http.replica_user_config())
        # Methods of an ingress class travel by value: helpers they use live on the class or
        # in importable modules, never as this module's private functions.
        self.keys = (
            api_keys.KeyRing(Storage(os.environ["AIAAS_STORAGE_ROOT"]), args.api_keys_file)
            if args.api_keys_file
            else None
        )
        batcher: Any = self.predict_batch  # type: ignore[misc]
        batcher.set_max_batch_size(args.max_batch_size)
        batcher.set_batch_wait_timeout_s(args.batch_wait_timeout_s)
        self.requests = aiaas_metrics.SERVE_REQUESTS.create(serve=True)
        self.latency = aiaas_metrics.SERVE_LATENCY.create(serve=True)
        self.batch_sizes = aiaas_metrics.SERVE_BATCH_SIZE.create(serve=True)
        self.queue = aiaas_metrics.SERVE_PENDING.create(serve=True)

    def _load(self, version: registry.Version) -> Loaded:
        predictor = artifacts.load(version, threads=self.args.threads)
        features = math.prod(predictor.input_shape) if predictor.input_shape else 0
        # Run once so the first request does not pay for lazy initialisation.
        if features:
            predictor.predict(np.zeros((1, features), dtype=np.float32))
        return Loaded(version.version, predictor, features, time.time())

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Switch to the pinned versions: load beside the old one, then swap."""
        await self.slots.apply(user_config)

    @app.get("/")
    async def list_models(self) -> dict[str, Any]:
        return {"models": [self._status(name) for name in self.slots.entries]}

    @app.get("/{name}")
    async def model_status(self, name: str) -> dict[str, Any]:
        self.slots.get(name)
        return self._status(name)

    @app.post("/{name}:predict")
    async def predict(self, name: str, request: Request) -> Any:
        started = time.perf_counter()
        loaded = self.slots.get(name)
        code = "200"
        try:
            if self.keys is not None:
                self.keys.check(request.headers.get("authorization"))
            rows = await self._instances(request, loaded)
            if self.pending >= self.args.max_pending:
                raise serve_http.ApiError(
                    503, "overloaded", "the model is overloaded; retry shortly"
                )
            self.pending += 1
            self.queue.set(self.pending, tags={"model": name})
            try:
                batcher: Any = self.predict_batch  # type: ignore[misc]
                predictions, version = await asyncio.wait_for(
                    batcher(name, rows), timeout=self.args.request_timeout_s
                )
            except TimeoutError:
                raise serve_http.ApiError(
                    504, "timeout", f"no answer within {self.args.request_timeout_s:g}s"
                ) from None
            finally:
                self.pending -= 1
            return {"predictions": predictions, "model": name, "version": version}
        except (serve_http.ApiError, api_keys.Denied) as exc:
            code = str(exc.status)
            raise
        finally:
            tags = {"model": name, "version": loaded.version}
            self.requests.inc(tags={**tags, "code": code})
            self.latency.observe((time.perf_counter() - started) * 1000, tags=tags)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)  # type: ignore[arg-type]
    async def predict_batch(  # type: ignore[misc]
        self, names: list[str], batches: list[np.ndarray]
    ) -> list[tuple[list[int], str]]:
        results: list[tuple[list[int], str]] = [([], "")] * len(names)
        for name in set(names):
            # Requests for one model run as one call; the version is read once so every
            # answer of the batch names the version that produced it.
            loaded = self.slots.loaded[name]
            members = [i for i, n in enumerate(names) if n == name]
            stacked = np.concatenate([batches[i] for i in members])
            classes = loaded.predictor.predict(stacked).argmax(axis=1).tolist()
            self.batch_sizes.observe(len(members), tags={"model": name})
            offset = 0
            for i in members:
                size = len(batches[i])
                results[i] = (classes[offset : offset + size], loaded.version)
                offset += size
        return results

    def _status(self, name: str) -> dict[str, Any]:
        loaded = self.slots.loaded.get(name)
        status: dict[str, Any] = {
            "name": name,
            "model": str(self.slots.entries[name]),
            "ready": loaded is not None,
            "version": loaded.version if loaded else None,
            "format": loaded.predictor.format if loaded else None,
            "input_shape": list(loaded.predictor.input_shape or ()) if loaded else None,
        }
        if name in self.slots.failed:
            status["failed_version"] = self.slots.failed[name]
        return status

    async def _instances(self, request: Request, loaded: Loaded) -> np.ndarray:
        payload = await serve_http.json_body(request, self.args.max_payload_bytes)
        instances = payload.get("instances") if isinstance(payload, dict) else None
        if not isinstance(instances, list) or not instances:
            raise serve_http.ApiError(
                400, "invalid_request", 'the body must be {"instances": [row, ...]} with rows'
            )
        if len(instances) > self.args.max_instances:
            raise serve_http.ApiError(
                413,
                "too_many_instances",
                f"{len(instances)} instances; at most {self.args.max_instances} per request",
            )
        try:
            rows = np.asarray(instances, dtype=np.float32)
        except (ValueError, TypeError):
            raise serve_http.ApiError(
                400, "invalid_instances", "instances must be rows of numbers of equal length"
            ) from None
        if rows.ndim < 2:
            raise serve_http.ApiError(
                422, "wrong_shape", "each instance must be a list of values (a row)"
            )
        rows = rows.reshape(len(rows), -1)
        if loaded.features and rows.shape[1] != loaded.features:
            shape = list(loaded.predictor.input_shape or ())
            raise serve_http.ApiError(
                422,
                "wrong_shape",
                f"each instance must have {loaded.features} values (shape {shape}); "
                f"got {rows.shape[1]}",
            )
        if not np.isfinite(rows).all():
            raise serve_http.ApiError(422, "not_finite", "instances contain NaN or infinite values")
        return rows


def build_app(args: Args) -> serve.Application:
    """The Serve application for ``args`` (what ``import_path`` names)."""
    return ModelServer.bind(args)  # type: ignore[attr-defined]
