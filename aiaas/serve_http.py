"""What every aiaas Serve app shares on the HTTP side: the versions it serves (read through the
pin contract, :mod:`aiaas.serving.pins`), JSON errors with the status codes of PRODUCT.md §5,
and bounded body reading.

Kept in the library (not in a Serve app module): methods of a Serve ingress class travel to the
replicas by value, and helpers they call must be importable there.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import RayServeException
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from aiaas import api_keys, errors, registry
from aiaas.serving import apps, pins

T = TypeVar("T")
logger = logging.getLogger("ray.serve")

#: OpenAI's error ``type`` for each status, so its client raises the matching exception.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    408: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
    504: "server_error",
}


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message", "type", "param"}}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = headers


def shown(value: object, limit: int = 100) -> str:
    """A client-supplied value as an error message may quote it: cut to ``limit`` characters,
    with lone surrogates replaced (they cannot be encoded, and would turn a 4xx into a 500)."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "…"
    return text.encode("utf-8", "replace").decode("utf-8")


def error_response(
    status: int,
    code: str,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {
        "error": {
            "code": code,
            "message": shown(message, 2000),
            "type": _TYPES.get(status, "server_error"),
            "param": param,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


def error_for(exc: ApiError | api_keys.Denied) -> JSONResponse:
    """The JSON answer for one of our errors."""
    if isinstance(exc, api_keys.Denied):
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        if exc.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return error_response(exc.status, exc.code, exc.message, headers=headers)
    return error_response(exc.status, exc.code, exc.message, exc.param, exc.headers)


#: Our codes for the HTTP errors Starlette's router raises itself.
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def install_error_handlers(app: FastAPI) -> None:
    """One place maps our errors, FastAPI's validation errors and Starlette's own 404/405 (and
    any fault of ours, as a 500 without a traceback) to JSON answers in one shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_for(exc)

    @app.exception_handler(api_keys.Denied)
    async def _denied(request: Request, exc: api_keys.Denied) -> JSONResponse:
        return error_for(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}"
            for e in exc.errors()[:3]
        ]
        return error_response(422, "invalid_request", "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        if exc.status_code == 404:
            message = f"no such route: {shown(request.url.path)}"
        elif exc.status_code == 405:
            message = f"{shown(request.url.path)} does not take {shown(request.method, 20)}"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, code, message, headers=dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _fault(request: Request, exc: Exception) -> JSONResponse:
        logger.error("request %s failed", shown(request.url.path), exc_info=exc)
        return error_response(500, "internal_error", "the server failed")


def route(request: Request, verbs: tuple[str, ...]) -> tuple[str | None, str]:
    """The model name and verb a path below the app's route prefix names.

    ``/`` → ``(None, "")``, ``/NAME`` → ``(NAME, "")``, ``/NAME:VERB`` → ``(NAME, VERB)`` for a
    verb in ``verbs``; any other path is a 404.
    """
    path, root = request.scope["path"], request.scope.get("root_path", "")
    # Serve mounts the app at root_path; servers differ on whether path repeats it.
    if root and path.startswith(root):
        path = path[len(root) :]
    path = path.strip("/")
    if not path:
        return None, ""
    name, _, verb = path.partition(":")
    if "/" in name or (verb and verb not in verbs):
        raise ApiError(404, "not_found", f"no such route: {shown(request.url.path)}")
    return name, verb


def require_method(request: Request, method: str) -> None:
    """A 405 unless the request uses ``method``."""
    if request.method != method:
        raise ApiError(
            405,
            "method_not_allowed",
            f"{shown(request.url.path)} takes {method}, not {shown(request.method, 20)}",
            headers={"Allow": method},
        )


class PrefixRoot:
    """Serves a request for the route prefix itself as the app's root.

    At ``route_prefix: /v1/embeddings``, ``POST /v1/embeddings`` reaches the app with an empty
    path, which Starlette answers with a 307 to add a slash: curl does not follow it (``make
    demo`` printed nothing) and OpenAI clients pay a second round trip. Pure ASGI middleware:
    it only rewrites the path of such a request."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        root = scope.get("root_path", "") if scope["type"] == "http" else ""
        if root and scope["path"] == root:
            scope = {**scope, "path": f"{root}/", "raw_path": f"{root}/".encode()}
        await self.app(scope, receive, send)


def only_at_own_prefix(request: Request, segment: str, name: str | None = None) -> None:
    """Routes an app also serves without its first path ``segment`` (the embeddings app at
    ``/v1/embeddings``) exist only at a route prefix that ends with it. At ``/v1``,
    ``GET /v1/embeddings`` stays a POST-only path (405) and ``POST /v1`` or ``GET /v1/x`` no
    route of the app (404). ``name``: the model a status route names (None on the POST)."""
    root = request.scope.get("root_path", "").rstrip("/")
    if root.endswith(segment):
        return
    path = request.scope["path"]
    # Serve mounts the app at root_path; servers differ on whether path repeats it.
    relative = path[len(root) :] if root and path.startswith(root) else path
    if relative.startswith(segment + "/") or (name is None and relative == segment):
        return
    if name is not None and relative == segment:
        raise ApiError(
            405,
            "method_not_allowed",
            f"{shown(request.url.path)} takes POST, not GET",
            headers={"Allow": "POST"},
        )
    raise ApiError(404, "not_found", f"no such route: {shown(request.url.path)}")


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refusing more than ``limit`` bytes (413) as they arrive: a chunked
    body (no Content-Length) is counted while it is read, never read whole first."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(
                    413,
                    "payload_too_large",
                    f"the body has more than {limit} bytes; the limit is {limit}",
                )
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(
            400, "incomplete_body", "the connection closed before the whole body arrived"
        ) from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_json(body: bytes) -> Any:
    """``body`` as JSON; 400 for anything else (invalid UTF-8, nesting too deep for Python)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ApiError(400, "invalid_json", "the body is not JSON") from None


async def json_body(request: Request, limit: int) -> Any:
    """The request's JSON, refusing bodies over ``limit`` bytes (413) and non-JSON (400)."""
    return parse_json(await read_body(request, limit))


def too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the body has {size} bytes; the limit is {limit}")


def body_timeout(seconds: float) -> ApiError:
    return ApiError(408, "request_timeout", f"the body did not arrive within {seconds:g}s")


def answer_timeout(seconds: float) -> ApiError:
    return ApiError(504, "timeout", f"no answer within {seconds:g}s")


def replica_user_config() -> dict[str, Any] | None:
    """The ``user_config`` this replica starts with, before Serve calls ``reconfigure``.

    Serve sets the replica context before the constructor runs; outside a replica (a plain
    Python test of the class) there is none.
    """
    try:
        context = serve.get_replica_context()
    except RayServeException:
        return None
    config = getattr(context, "_deployment_config", None)
    user_config = getattr(config, "user_config", None)
    return user_config if isinstance(user_config, dict) else None


class Slots(Generic[T]):
    """The versions one replica serves, by served name, and how they are switched.

    ``load`` turns a registry version into what the app serves (a predictor, an embedder);
    what it returns must carry the version number as ``.version``. A pin change loads the new
    version beside the old one and swaps only when it loaded, so requests keep being answered
    and a version that fails to load never takes traffic (the failure is kept in ``failed``).
    """

    def __init__(
        self,
        served: Sequence[apps.ServedModel],
        load: Callable[[registry.Version], T],
        user_config: dict[str, Any] | None = None,
    ) -> None:
        self.entries = {entry.name: registry.parse_ref(entry.model) for entry in served}
        self._load = load
        # A replica started while an alias is being moved must load what the deployment pins,
        # not what the alias names at that moment (a version that may yet fail and be undone).
        self._pins = pins.Pins.read(user_config)
        self.loaded: dict[str, T] = {
            name: load(self._version(name, self._pins.versions.get(name))) for name in self.entries
        }
        self.failed: dict[str, dict[str, str]] = {}

    def get(self, name: str) -> T:
        """What serves ``name``; 404 when this app serves no such model."""
        found = self.loaded.get(name)
        if found is None:
            raise ApiError(
                404,
                "model_not_found",
                f"no model '{shown(name)}' here; served: {', '.join(self.entries)}",
                "model",
            )
        return found

    async def apply(self, user_config: dict[str, Any] | None) -> None:
        """Serve the versions ``user_config`` pins (Serve's ``reconfigure``)."""
        self._pins = pins.Pins.read(user_config)
        for name, version in self._pins.versions.items():
            current = self.loaded.get(name)
            if name not in self.entries or (
                current is not None and getattr(current, "version", None) == version
            ):
                self.failed.pop(name, None)
                continue
            try:
                loaded = await asyncio.to_thread(self._version_loaded, name, version)
            except Exception as exc:  # any load failure: keep serving what works
                message = exc.message if isinstance(exc, errors.AiaasError) else str(exc)
                self.failed[name] = {"version": version, "error": message[:500]}
                logger.error("model %s version %s failed to load: %s", name, version, message)
                if current is None:
                    raise
                continue
            self.loaded[name] = loaded
            self.failed.pop(name, None)
            logger.info("model %s now serves version %s", name, version)

    def _version_loaded(self, name: str, version: str) -> T:
        return self._load(self._version(name, version))

    def _version(self, name: str, version: str | None) -> registry.Version:
        """The version of ``name`` to load: from the deployment's record of the pinned version
        when it has one (a new replica then starts without the registry, and without importing
        MLflow: ~1 s of a scale-out on a loaded machine), else as the registry resolves it."""
        ref = self.entries[name]
        recorded = self._pins.recorded(name, ref.name, version)
        if recorded is not None:
            return recorded
        return registry.resolve(registry.ModelRef(ref.name, version=version) if version else ref)
