"""OpenAI's chat and completions request and response shapes, as the LLM app takes and sends them.

Requests are pydantic models in strict mode (``"max_tokens": "5"`` or ``true`` is a 400, not a
coerced value); a refused request names its field as OpenAI's ``param``. Fields OpenAI's clients
send that change nothing here (``user``, zero penalties, ``logprobs: false``) are accepted;
fields asking for something this server does not do (``n`` > 1, tools, log probabilities,
``echo``, ``suffix``) are refused rather than silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from aiaas.serve_http import ApiError, shown

Number = Annotated[float, Field(strict=True)]
ROLES = ("system", "developer", "user", "assistant", "tool")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: StrictBool = False


class Common(BaseModel):
    """What chat and completion requests share."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number = Field(1.0, ge=0, le=2)
    top_p: Number = Field(1.0, gt=0, le=1)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt = Field(1, ge=1, le=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: Number = Field(0.0, ge=0, le=0)
    presence_penalty: Number = Field(0.0, ge=0, le=0)
    logprobs: StrictBool | StrictInt | None = None
    user: StrictStr | None = None

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not stop for stop in stops):
            raise ApiError(400, "invalid_stop", "'stop' takes up to 4 non-empty strings", "stop")
        return tuple(stops)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    tools: None = None
    tool_choice: None = None
    top_logprobs: None = None

    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat(self) -> list[dict[str, str]]:
        # The template knows system, user and assistant; developer is OpenAI's new system.
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]


class CompletionRequest(Common):
    prompt: StrictStr | list[StrictStr]
    echo: Literal[False] = False
    suffix: None = None
    best_of: StrictInt = Field(1, ge=1, le=1)

    def output_limit(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else 16  # OpenAI's default

    def text(self) -> str:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if len(prompts) != 1:
            raise ApiError(400, "invalid_prompt", "send one prompt string per request", "prompt")
        if not prompts[0]:
            raise ApiError(400, "invalid_prompt", "'prompt' must not be empty", "prompt")
        return prompts[0]


_HINTS = {
    "n": "only n: 1 is served",
    "best_of": "only best_of: 1 is served",
    "frequency_penalty": "penalties are not supported (send 0)",
    "presence_penalty": "penalties are not supported (send 0)",
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "top_logprobs": "log probabilities are not supported",
    "echo": "echo is not supported",
    "suffix": "suffix is not supported",
    "role": f"roles are {', '.join(ROLES)}",
    "content": "content is a string or a list of text parts",
}


def parse(model: type[Common], body: Any) -> Any:
    """A request model from a JSON body; a 400 naming the first bad field otherwise."""
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "the body must be a JSON object")
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = [str(part) for part in error.get("loc", ())]
        field = next((p for p in reversed(where) if not p.isdigit() and p in _HINTS), None)
        param = ".".join(where[:1] + [p for p in where[1:] if p.isdigit()][:1])
        if where[:1] == ["messages"] and len(where) > 1:
            param = f"messages[{where[1]}]" + (f".{where[2]}" if len(where) > 2 else "")
        hint = _HINTS.get(field or (where[0] if where else ""), "")
        message = f"{'.'.join(where) or 'body'}: {error.get('msg')}"
        if error.get("type") == "missing":
            message = f"'{'.'.join(where)}' is required"
        raise ApiError(
            400,
            "invalid_request",
            shown(message + (f" ({hint})" if hint else ""), 300),
            param or None,
        ) from None
    if request.logprobs not in (None, False, 0):
        raise ApiError(400, "unsupported", "log probabilities are not supported", "logprobs")
    if request.stream_options is not None and not request.stream:
        raise ApiError(
            400, "invalid_request", "stream_options needs stream: true", "stream_options"
        )
    return request


def completion_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def response(
    kind: str,
    request_id: str,
    model: str,
    version: str,
    text: str,
    finish: str,
    counts: dict[str, int],
    created: int | None = None,
) -> dict[str, Any]:
    """A whole (not streamed) answer."""
    created = created or int(time.time())
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
            "logprobs": None,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return {
        "id": request_id,
        "object": obj,
        "created": created,
        "model": model,
        "system_fingerprint": f"aiaas-{model}-v{version}",
        "choices": [choice],
        "usage": counts,
    }


def chunk(
    kind: str,
    request_id: str,
    model: str,
    version: str,
    created: int,
    text: str | None,
    finish: str | None = None,
    role: bool = False,
    counts: dict[str, int] | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    """One streamed event; ``text`` None and ``counts`` given: the usage-only last chunk."""
    choices: list[dict[str, Any]] = []
    if text is not None or finish is not None:
        if kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text:
                delta["content"] = text
            elif role:
                delta["content"] = ""
            choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        else:
            choices = [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
    event: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": f"aiaas-{model}-v{version}",
        "choices": choices,
    }
    if include_usage:
        event["usage"] = counts  # None on every chunk but the last, as OpenAI sends it
    return event
