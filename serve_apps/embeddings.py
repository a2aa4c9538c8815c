"""OpenAI-compatible embeddings on Ray Serve: registered sentence-transformers versions.

``import_path: serve_apps.embeddings:build_app`` with ``route_prefix: /v1``:

- ``POST /v1/embeddings`` with ``{"model": ..., "input": str | [str], "encoding_format":
  "float" | "base64", "dimensions": n}`` → OpenAI's response shape, with token counts from the
  model's own tokenizer
- ``GET /v1/models`` → every model of every OpenAI-style app on the cluster, in OpenAI's list
  shape (when the model server is deployed beside it, ``/v1/models`` is its route, and it
  answers the same list)
- ``GET /v1/embeddings/{model}`` → readiness and the version being served

Beside the LLM app (route prefix ``/v1``), give this app ``route_prefix: /v1/embeddings``: the
same URLs keep working.

Requests are batched across clients (``@serve.batch``); inputs over the model's token limit are
refused unless the request asks for truncation (``"truncate": true``, an aiaas extension).
Versions are pinned and switched in place like the model server's.
"""

# No `from __future__ import annotations`: Serve reads build_app's annotation to build Args.

import asyncio
import base64
import concurrent.futures
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from ray import serve

from aiaas import api_keys, artifacts, openai_models, registry, serve_http
from aiaas import metrics as aiaas_metrics
from aiaas.serving import apps as serving_apps

logger = logging.getLogger("ray.serve")


#: The app's arguments (the ``args:`` of its entry in a Serve config file), owned by the library.
Args = serving_apps.EmbeddingsArgs


@dataclass
class Loaded:
    """An embedding version loaded in this replica."""

    version: str
    embedder: artifacts.Embedder
    created: int


app = FastAPI(title="aiaas embeddings", docs_url=None, redoc_url=None)
serve_http.install_error_handlers(app)
app.add_middleware(serve_http.PrefixRoot)


@serve.deployment(name=serving_apps.EMBEDDINGS.deployment, max_ongoing_requests=64)
@serve.ingress(app)
class Embeddings:
    """Serves the embedding models of :class:`Args`, batching texts across requests."""

    def __init__(self, args: Args) -> None:
        self.args = args
        # One thread runs every tokenizer and model call: Hugging Face's fast tokenizers fail
        # ("Already borrowed") when two threads use one at once.
        self.model_thread = concurrent.futures.ThreadPoolExecutor(1, "embeddings-model")
        self.slots = serve_http.Slots(args.models, self._load, serve_http.replica_user_config())
        self.keys = api_keys.replica_ring(args.api_keys_file)
        self.catalogue = openai_models.Catalogue()
        self.pending = 0
        batcher: Any = self.embed_batch  # type: ignore[misc]
        batcher.set_max_batch_size(args.max_batch_size)
        batcher.set_batch_wait_timeout_s(args.batch_wait_timeout_s)
        self.requests = aiaas_metrics.EMBEDDINGS_REQUESTS.create(serve=True)
        self.tokens = aiaas_metrics.EMBEDDINGS_TOKENS.create(serve=True)
        self.batch_sizes = aiaas_metrics.EMBEDDINGS_BATCH_SIZE.create(serve=True)

    def _load(self, version: registry.Version) -> Loaded:
        embedder = artifacts.load_embedder(version, threads=self.args.threads)
        embedder.encode(["warm up"])  # the first call pays for lazy initialisation
        return Loaded(version.version, embedder, int(version.created))

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Switch to pinned versions: load beside the old one, then swap (as the model server)."""
        await self.slots.apply(user_config)

    async def _authorize(self, request: Request, status: bool = False) -> None:
        if self.keys is not None:
            await self.keys.admit(request.headers.get("authorization"), status)

    def openai_models(self) -> list[dict[str, Any]]:
        """This app's models in OpenAI's shape (what ``GET /v1/models`` of any app lists)."""
        return [
            {
                "id": name,
                "object": "model",
                "created": loaded.created,
                "owned_by": "aiaas",
                "version": loaded.version,
                "kind": "embeddings",
                "dimensions": loaded.embedder.dimension,
                "max_input_tokens": loaded.embedder.max_tokens,
                **(
                    {"failed_version": self.slots.failed[name]} if name in self.slots.failed else {}
                ),
            }
            for name, loaded in self.slots.loaded.items()
        ]

    @app.get("/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        await self._authorize(request, status=True)
        own = self.openai_models()
        return {"object": "list", "data": await self.catalogue.models(own, "Embeddings")}

    # Not under /models: beside the model server (route /v1/models) that path would be its.
    # At route prefix /v1/embeddings (beside the LLM app at /v1) the same routes lose their
    # first segment: POST /v1/embeddings is "/", a status is "/{name}".
    @app.get("/embeddings/{name}")
    @app.get("/{name}")
    async def model_status(self, name: str, request: Request) -> dict[str, Any]:
        serve_http.only_at_own_prefix(request, serving_apps.EMBEDDINGS.segment, name)
        await self._authorize(request, status=True)
        loaded = self.slots.get(name)
        status = {
            "name": name,
            "model": str(self.slots.entries[name]),
            "ready": True,
            "version": loaded.version,
            "format": loaded.embedder.format,
        }
        if name in self.slots.failed:
            status["failed_version"] = self.slots.failed[name]
        return status

    @app.post("/embeddings")
    @app.post("/")
    async def embeddings(self, request: Request) -> dict[str, Any]:
        serve_http.only_at_own_prefix(request, serving_apps.EMBEDDINGS.segment)
        # Metrics name a model only once it is one this app serves: a label per made-up
        # name would grow without bound.
        code, name, version = "200", "?", "?"
        reading = True
        timeout = self.args.request_timeout_s
        try:
            await self._authorize(request)
            # One timeout covers reading the body and answering: a body that arrives slowly
            # or never gets a 408 instead of holding the replica.
            async with asyncio.timeout(timeout):
                body = await serve_http.json_body(request, self.args.max_payload_bytes)
                reading = False
                loaded = self._model(body)
                name, version = body["model"], loaded.version
                if self.pending >= self.args.max_pending:
                    raise serve_http.ApiError(
                        503, "overloaded", "the model is overloaded; retry shortly"
                    )
                self.pending += 1
                try:
                    answer, version = await self._embed(body, name, loaded)
                finally:
                    self.pending -= 1
            return answer
        except TimeoutError:
            code = "408" if reading else "504"
            if reading:
                raise serve_http.body_timeout(timeout) from None
            raise serve_http.answer_timeout(timeout) from None
        except (serve_http.ApiError, api_keys.Denied) as exc:
            code = str(exc.status)
            raise
        finally:
            self.requests.inc(tags={"model": name, "version": version, "code": code})

    def _model(self, body: Any) -> Loaded:
        if not isinstance(body, dict):
            raise serve_http.ApiError(400, "invalid_request", "the body must be a JSON object")
        name = body.get("model")
        if not isinstance(name, str):
            raise serve_http.ApiError(400, "invalid_model", "'model' must be a string", "model")
        return self.slots.get(name)

    async def _embed(
        self, body: dict[str, Any], name: str, loaded: Loaded
    ) -> tuple[dict[str, Any], str]:
        texts = self._texts(body.get("input"))
        truncate = body.get("truncate", False)
        if not isinstance(truncate, bool):
            raise serve_http.ApiError(
                400, "invalid_truncate", "'truncate' must be true or false", "truncate"
            )
        dimensions = body.get("dimensions")
        if dimensions is not None and (
            isinstance(dimensions, bool) or not isinstance(dimensions, int)
        ):
            raise serve_http.ApiError(
                400, "invalid_dimensions", "'dimensions' must be an integer", "dimensions"
            )
        if dimensions is not None and dimensions != loaded.embedder.dimension:
            raise serve_http.ApiError(
                400,
                "unsupported_dimensions",
                f"{name} makes {loaded.embedder.dimension}-dimensional embeddings and cannot "
                f"shorten them; omit 'dimensions' or send {loaded.embedder.dimension}",
                "dimensions",
            )
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise serve_http.ApiError(
                400,
                "invalid_encoding_format",
                "encoding_format must be 'float' or 'base64'",
                "encoding_format",
            )
        counts = await self._in_model_thread(loaded.embedder.token_counts, texts)
        too_long = [i for i, n in enumerate(counts) if n > loaded.embedder.max_tokens]
        if too_long and not truncate:
            raise serve_http.ApiError(
                400,
                "input_too_long",
                f"input {too_long[0]} has {counts[too_long[0]]} tokens; {name} takes at most "
                f'{loaded.embedder.max_tokens} (send "truncate": true to cut longer inputs)',
                "input",
            )
        if self.pending == 1:
            # Alone in the replica: nothing could join a batch, so it is not held for one;
            # requests that arrive while it runs meet each other in the batcher.
            loaded = self.slots.loaded[name]
            vectors = await self._in_model_thread(loaded.embedder.encode, texts)
            version = loaded.version
            self.batch_sizes.observe(1, tags={"model": name})
        else:
            batcher: Any = self.embed_batch  # type: ignore[misc]
            vectors, version = await batcher(name, texts)
        tokens = sum(min(n, loaded.embedder.max_tokens) for n in counts)
        self.tokens.inc(tokens, tags={"model": name})
        answer = {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": self._encode(vector, encoding)}
                for i, vector in enumerate(vectors)
            ],
            "model": name,
            "version": version,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return answer, version

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)  # type: ignore[arg-type]
    async def embed_batch(  # type: ignore[misc]
        self, names: list[str], texts: list[list[str]]
    ) -> list[tuple[np.ndarray, str]]:
        results: list[tuple[np.ndarray, str]] = [(np.empty((0, 0)), "")] * len(names)
        for name in set(names):
            loaded = self.slots.loaded[name]
            members = [i for i, n in enumerate(names) if n == name]
            flat = [text for i in members for text in texts[i]]
            # One forward pass for every request's texts: the model sees one big batch.
            vectors = await self._in_model_thread(loaded.embedder.encode, flat)
            self.batch_sizes.observe(len(members), tags={"model": name})
            offset = 0
            for i in members:
                size = len(texts[i])
                results[i] = (vectors[offset : offset + size], loaded.version)
                offset += size
        return results

    async def _in_model_thread(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.model_thread, function, *args)

    @staticmethod
    def _encode(vector: np.ndarray, encoding: str) -> Any:
        # A method, not a module function: the ingress class reaches replicas by value.
        if encoding == "base64":
            return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
        return vector.tolist()

    def _texts(self, value: Any) -> list[str]:
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not texts:
            raise serve_http.ApiError(
                400,
                "invalid_input",
                "'input' must be a string or a non-empty list of strings",
                "input",
            )
        if not all(isinstance(text, str) for text in texts):
            raise serve_http.ApiError(
                400,
                "invalid_input",
                "every input must be a string (token arrays are not supported)",
                "input",
            )
        if any(not text for text in texts):
            raise serve_http.ApiError(400, "invalid_input", "inputs must not be empty", "input")
        for i, text in enumerate(texts):
            # A lone surrogate ("\\ud800" in JSON) is no text the tokenizer can take.
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise serve_http.ApiError(
                    400, "invalid_input", f"input {i} is not valid Unicode text", "input"
                ) from None
        if len(texts) > self.args.max_inputs:
            raise serve_http.ApiError(
                413,
                "too_many_inputs",
                f"{len(texts)} inputs; at most {self.args.max_inputs} per request",
                "input",
            )
        return texts


def build_app(args: Args) -> serve.Application:
    """The Serve application for ``args`` (what ``import_path`` names)."""
    return Embeddings.bind(args)  # type: ignore[attr-defined]
