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
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from aiaas import api_keys, artifacts, openai_models, registry, serve_http
from aiaas import metrics as aiaas_metrics
from aiaas.serving import apps as serving_apps

logger = logging.getLogger("ray.serve")


#: The app's arguments (the ``args:`` of its entry in a Serve config file), owned by the library.
Args = serving_apps.ModelServerArgs


@dataclass
class Loaded:
    """A version loaded in this replica."""

    version: str
    predictor: artifacts.Predictor
    features: int
    loaded_at: float


# Serve's access log writes a line per request from the replica's event loop: ~20% of its
# throughput here. Off by default; `logging_config: {enable_access_log: true}` in the
# deployment's entry of the Serve config turns it on.
@serve.deployment(
    name=serving_apps.MODEL_SERVER.deployment,
    max_ongoing_requests=64,
    logging_config={"enable_access_log": False},
)
class ModelServer:
    """Serves every model of :class:`Args` from one replica, with batching across requests.

    Routes by hand instead of through a FastAPI ingress: for a model this small, FastAPI's
    routing, parameter solving and response encoding cost more per request than the model
    (BENCHMARKS.md, "Where serving time goes").
    """

    def __init__(self, args: Args) -> None:
        self.args = args
        self.pending = 0
        self.catalogue = openai_models.Catalogue()
        self.slots = serve_http.Slots(args.models, self._load, serve_http.replica_user_config())
        self.keys = api_keys.replica_ring(args.api_keys_file)
        batcher: Any = self.predict_batch  # type: ignore[misc]
        batcher.set_max_batch_size(args.max_batch_size)
        batcher.set_batch_wait_timeout_s(args.batch_wait_timeout_s)
        self.requests = aiaas_metrics.SERVE_REQUESTS.create(serve=True)
        self.latency = aiaas_metrics.SERVE_LATENCY.create(serve=True)
        self.batch_sizes = aiaas_metrics.SERVE_BATCH_SIZE.create(serve=True)
        self.queue = aiaas_metrics.SERVE_PENDING.create(serve=True)
        self._pending_written, self._pending_shown = 0.0, 0

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

    async def __call__(self, request: Request) -> Response:
        try:
            name, verb = serve_http.route(request, ("predict",))
            if name is not None and verb:
                serve_http.require_method(request, "POST")
                return JSONResponse(await self.predict(name, request))
            serve_http.require_method(request, "GET")
            if self.keys is not None:  # status and list obey keys like predict
                await self.keys.admit(request.headers.get("authorization"), status=True)
            if name is None:
                # KServe's list beside OpenAI's: this route shadows the LLM and embeddings
                # apps' GET /v1/models, so it lists their models for OpenAI clients.
                return JSONResponse(
                    {
                        "models": [self._status(n) for n in self.slots.entries],
                        "object": "list",
                        "data": await self.catalogue.models([], None),
                    }
                )
            self.slots.get(name)
            return JSONResponse(self._status(name))
        except (serve_http.ApiError, api_keys.Denied) as exc:
            return serve_http.error_for(exc)
        except Exception:  # a fault of ours: logged whole, answered without a traceback
            logger.exception("request %s %s failed", request.method, request.url.path)
            return serve_http.error_response(500, "internal_error", "the server failed")

    async def predict(self, name: str, request: Request) -> Any:
        started = time.perf_counter()
        loaded = self.slots.loaded.get(name)
        if loaded is None:
            # Unknown keys learn nothing of which models exist; unknown names are counted in
            # no metric (a label per made-up name would grow without bound).
            if self.keys is not None:
                await self.keys.admit(request.headers.get("authorization"))
            self.slots.get(name)  # the 404
        assert loaded is not None
        code = "200"
        reading = True
        timeout = self.args.request_timeout_s
        try:
            if self.keys is not None:
                await self.keys.admit(request.headers.get("authorization"))
            # One timeout covers reading the body and answering (asyncio.timeout, not
            # wait_for: no extra task per request): a body that arrives slowly or never
            # gets a 408 instead of holding the replica.
            async with asyncio.timeout(timeout):
                rows = await self._instances(request, loaded)
                reading = False
                if self.pending >= self.args.max_pending:
                    raise serve_http.ApiError(
                        503, "overloaded", "the model is overloaded; retry shortly"
                    )
                self._count_pending(name, +1)
                try:
                    if self.args.max_batch_size == 1 or self.pending == 1:
                        # Unbatched, or alone in the replica: nothing could join a batch, so
                        # the request skips @serve.batch's wait, queue and task (and the four
                        # histograms Serve observes per batch); requests that arrive while it
                        # runs meet each other in the batcher. But Serve's autoscaling samples
                        # ongoing requests between event-loop steps, and a request that runs
                        # in one step is never seen: an overloaded replica then reports no
                        # load and is never scaled out. Measured here: 1 yield, no scale-out
                        # in 60 s; 2, 9.6 s; 3, 8–9 s.
                        for _ in range(3):
                            await asyncio.sleep(0)
                        predictions, version = self._predict(name, rows)
                        self.batch_sizes.observe(1, tags={"model": name})
                    else:
                        batcher: Any = self.predict_batch  # type: ignore[misc]
                        predictions, version = await batcher(name, rows)
                finally:
                    self._count_pending(name, -1)
            return {"predictions": predictions, "model": name, "version": version}
        except TimeoutError:
            code = "408" if reading else "504"
            if reading:
                raise serve_http.body_timeout(timeout) from None
            raise serve_http.answer_timeout(timeout) from None
        except (serve_http.ApiError, api_keys.Denied) as exc:
            code = str(exc.status)
            raise
        except Exception:
            code = "500"
            raise
        finally:
            tags = {"model": name, "version": loaded.version}
            self.requests.inc(tags={**tags, "code": code})
            self.latency.observe((time.perf_counter() - started) * 1000, tags=tags)

    def _count_pending(self, name: str, change: int) -> None:
        """Track pending requests; the gauge is written at most every half second (and when
        the replica goes idle), not twice per request."""
        self.pending += change
        now = time.monotonic()
        idle_again = self.pending == 0 and self._pending_shown != 0
        if idle_again or now - self._pending_written >= 0.5:
            self.queue.set(self.pending, tags={"model": name})
            self._pending_written, self._pending_shown = now, self.pending

    def _predict(self, name: str, rows: np.ndarray) -> tuple[list[int], str]:
        # The version is read once, so the answer names the version that produced it.
        loaded = self.slots.loaded[name]
        return loaded.predictor.predict(rows).argmax(axis=1).tolist(), loaded.version

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)  # type: ignore[arg-type]
    async def predict_batch(  # type: ignore[misc]
        self, names: list[str], batches: list[np.ndarray]
    ) -> list[tuple[list[int], str]]:
        results: list[tuple[list[int], str]] = [([], "")] * len(names)
        for name in set(names):
            # Requests for one model run as one call.
            members = [i for i, n in enumerate(names) if n == name]
            classes, version = self._predict(name, np.concatenate([batches[i] for i in members]))
            self.batch_sizes.observe(len(members), tags={"model": name})
            offset = 0
            for i in members:
                size = len(batches[i])
                results[i] = (classes[offset : offset + size], version)
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
        body = await serve_http.read_body(request, self.args.max_payload_bytes)
        payload = serve_http.parse_json(body)
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
        # numpy turns "1" and true into numbers without a word. A string or a boolean shows
        # in the body as a quote beyond the two of "instances", or as a literal: only such
        # bodies pay for a look at every value.
        if body.count(b'"') > 2 or b"true" in body or b"false" in body:
            _numbers_only(instances)
        try:
            rows = np.asarray(instances, dtype=np.float32)
        except OverflowError:  # an integer beyond float's range
            raise _not_finite() from None
        except (ValueError, TypeError, RecursionError):
            raise _invalid_instances() from None
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
        # Numbers beyond float32's range arrive here as infinities.
        if not np.isfinite(rows).all():
            raise _not_finite()
        return rows


def _invalid_instances() -> serve_http.ApiError:
    return serve_http.ApiError(
        400,
        "invalid_instances",
        "instances must be rows of numbers of equal length (not strings or booleans)",
    )


def _not_finite() -> serve_http.ApiError:
    return serve_http.ApiError(
        422, "not_finite", "instances contain NaN, infinite or out-of-range (float32) values"
    )


def _numbers_only(instances: list[Any]) -> None:
    """400 unless every leaf of ``instances`` is a JSON number (None counts: it is NaN)."""
    stack: list[Any] = [instances]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, bool) or not isinstance(value, (int, float, type(None))):
            raise _invalid_instances()


def build_app(args: Args) -> serve.Application:
    """The Serve application for ``args`` (what ``import_path`` names)."""
    return ModelServer.bind(args)  # type: ignore[attr-defined]
