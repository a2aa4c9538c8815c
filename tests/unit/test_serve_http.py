"""The HTTP pieces every Serve app shares: bodies counted while they arrive, JSON that Python
cannot parse, and error answers that quote what clients sent."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from starlette.requests import Request

from aiaas import serve_http


def _request(chunks: list[bytes], headers: dict[str, str] | None = None) -> tuple[Request, list]:
    """A request whose body arrives in ``chunks`` (chunked: no Content-Length unless given);
    the list records how many chunks the server asked for."""
    asked: list[int] = []

    async def receive() -> dict[str, Any]:
        asked.append(1)
        index = len(asked) - 1
        return {
            "type": "http.request",
            "body": chunks[index],
            "more_body": index < len(chunks) - 1,
        }

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(k.encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    return Request(scope, receive), asked


def test_a_chunked_body_is_refused_once_it_passes_the_limit_not_read_whole() -> None:
    request, asked = _request([b"x" * 1000] * 100)
    with pytest.raises(serve_http.ApiError) as refused:
        asyncio.run(serve_http.read_body(request, 4096))
    assert (refused.value.status, refused.value.code) == (413, "payload_too_large")
    assert len(asked) == 5  # 5,000 bytes read of 100,000


def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    request, asked = _request([b"{}"], {"content-length": "5000"})
    with pytest.raises(serve_http.ApiError):
        asyncio.run(serve_http.read_body(request, 4096))
    assert asked == []


def test_a_body_in_pieces_is_joined() -> None:
    request, _ = _request([b'{"a": ', b"1}"])
    assert serve_http.parse_json(asyncio.run(serve_http.read_body(request, 4096))) == {"a": 1}


@pytest.mark.parametrize(
    "body", [b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe{", b"", b"{nope", b'"\xed\xa0']
)
def test_what_python_cannot_parse_is_a_400(body: bytes) -> None:
    with pytest.raises(serve_http.ApiError) as refused:
        serve_http.parse_json(body)
    assert (refused.value.status, refused.value.code) == (400, "invalid_json")


def test_an_error_quoting_a_lone_surrogate_or_a_long_name_still_renders() -> None:
    answer = serve_http.error_response(404, "model_not_found", "no model '\ud800" + "x" * 5000)
    error = json.loads(answer.body)["error"]
    assert error["code"] == "model_not_found" and len(error["message"]) <= 2001
    assert serve_http.shown("a" * 500).endswith("…") and len(serve_http.shown("a" * 500)) == 101


@pytest.mark.parametrize(
    ("root", "path", "name", "status"),
    [
        ("/v1", "/v1/embeddings", None, None),  # POST /v1/embeddings at /v1
        ("/v1", "/embeddings", None, None),  # the same, when path leaves the root out
        ("/v1", "/v1/embeddings/minilm", "minilm", None),  # its status route
        ("/v1", "/v1/embeddings", "embeddings", 405),  # GET on the POST-only path
        ("/v1", "/v1/minilm", "minilm", 404),  # a short route at /v1 is none of ours
        ("/v1", "/v1", None, 404),  # POST /v1
        ("/v1/embeddings", "/v1/embeddings", None, None),  # beside the LLM app at /v1
        ("/v1/embeddings", "/v1/embeddings/minilm", "minilm", None),
    ],
)
def test_the_embeddings_short_routes_hold_only_at_their_own_prefix(
    root: str, path: str, name: str | None, status: int | None
) -> None:
    from starlette.requests import Request

    request = Request({"type": "http", "root_path": root, "path": path, "headers": []})
    if status is None:
        serve_http.only_at_own_prefix(request, "/embeddings", name)
        return
    with pytest.raises(serve_http.ApiError) as refused:
        serve_http.only_at_own_prefix(request, "/embeddings", name)
    assert refused.value.status == status
