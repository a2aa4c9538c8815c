"""What every aiaas Serve app shares on the HTTP side: the served-model entry of its ``Args``,
JSON errors with the status codes of PRODUCT.md §5, and bounded body reading.

Kept in the library (not in a Serve app module): methods of a Serve ingress class travel to the
replicas by value, and helpers they call must be importable there.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from aiaas import api_keys

#: OpenAI's error ``type`` for each status, so its client raises the matching exception.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
    504: "server_error",
}


class ServedModel(BaseModel):
    """One model of an app: the name clients use and the registered version behind it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$", description="name clients use, e.g. 'digits'"
    )
    model: str = Field(description="NAME@ALIAS (follows promotions) or NAME:VERSION (pinned)")


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message", "type", "param"}}``."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


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
            "message": message,
            "type": _TYPES.get(status, "server_error"),
            "param": param,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """One place maps our errors (and FastAPI's validation errors) to JSON answers."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.param)

    @app.exception_handler(api_keys.Denied)
    async def _denied(request: Request, exc: api_keys.Denied) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {"Retry-After": "1"}
        return error_response(exc.status, exc.code, exc.message, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", str(exc.errors()[:3]))


async def json_body(request: Request, limit: int) -> Any:
    """The request's JSON, refusing bodies over ``limit`` bytes (413) and non-JSON (400)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    body = await request.body()
    if len(body) > limit:
        raise too_large(len(body), limit)
    try:
        return json.loads(body)
    except ValueError:
        raise ApiError(400, "invalid_json", "the body is not JSON") from None


def too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"the body has {size} bytes; the limit is {limit}")


def pins(user_config: dict[str, Any] | None) -> dict[str, str]:
    """The versions a deployment's ``user_config`` pins, by served name."""
    return {str(k): str(v) for k, v in (user_config or {}).get("versions", {}).items()}
