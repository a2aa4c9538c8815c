"""Conversations → training rows: read and check them, tokenize with a chat template, mask, pad.

A conversation is OpenAI-style ``messages`` (``system`` / ``user`` / ``assistant`` turns) ending
with the assistant's answer. It is tokenized as the model will see it when served: the tokenizer's
own chat template renders the whole conversation, and the rendered text is tokenized without
adding special tokens (the template already holds them), as ``apply_chat_template`` does.

Only the assistant's tokens are learnt. Where they are is found from the template itself, not from
ChatML's markers: for each assistant turn, the conversation up to that turn rendered with the
generation prompt (for SmolLM2's ChatML, ending ``<|im_start|>assistant\\n``) is a prefix of the
conversation rendered through that turn; the turn's tokens are what follows the prefix, up to and
including the end-of-turn (eos) token. The newline the template writes after ``<|im_end|>`` and
the next turn's header are not labelled: the served model stops at the end-of-turn token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiaas import errors

#: The label of a token that carries no loss (PyTorch's cross-entropy ``ignore_index``).
IGNORE = -100
ROLES = ("system", "user", "assistant")
#: Problems listed in one error; the rest are counted.
_SHOWN = 10
_SHAPE = (
    'Each line must be a JSON object like {"messages": [{"role": "user", "content": "Hi"}, '
    '{"role": "assistant", "content": "Hello!"}]}, ending with the assistant\'s answer.'
)

Message = dict[str, str]


@dataclass(frozen=True)
class Conversation:
    """One conversation and where it came from (a JSONL line number, or its generated index)."""

    messages: list[Message]
    line: int


@dataclass(frozen=True)
class Example:
    """One tokenized conversation, unpadded."""

    input_ids: list[int]
    labels: list[int]
    prompt: str  # JSON of the messages before the final assistant turn
    target: str  # the final assistant turn's content


def read_jsonl(path: Path, shown_as: str) -> list[Conversation]:
    """Read and check a JSONL file of ``{"messages": [...]}`` objects (blank lines are skipped).

    Raises:
        ConfigError: The file is missing or empty, or lines are not usable conversations; every
            bad line is listed with its number.
    """
    if not path.is_file():
        raise errors.ConfigError(
            f"source.path '{shown_as}' is not a file", "Point source.path at a .jsonl file."
        )
    found: list[Conversation] = []
    problems: list[str] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                problems.append(f"line {number}: not JSON ({exc})")
                continue
            messages = record.get("messages") if isinstance(record, dict) else None
            problem = conversation_problem(messages)
            if problem:
                problems.append(f"line {number}: {problem}")
            elif isinstance(messages, list):  # always, once conversation_problem found none
                found.append(Conversation(_plain(messages), number))
    if problems:
        raise errors.ConfigError(
            listed(f"{shown_as}: not a valid chat data file", problems), _SHAPE
        )
    if not found:
        raise errors.ConfigError(f"{shown_as}: the file holds no conversations", _SHAPE)
    return found


def conversation_problem(messages: Any) -> str | None:
    """What makes ``messages`` unusable as a training conversation, or None."""
    if not isinstance(messages, list) or not messages:
        return "no 'messages' list (or it is empty)"
    for index, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            return f"message {index} is not an object with 'role' and 'content'"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"message {index} has role {json.dumps(role)}; roles are {', '.join(ROLES)}"
        if not isinstance(content, str):
            return f"message {index} ({role}) has no text 'content'"
    roles = [message["role"] for message in messages]
    first = next((role for role in roles if role != "system"), None)
    if first != "user":
        return "the first message after any system message must be from the user"
    if roles[-1] != "assistant":
        return f"the last message is from the {roles[-1]}; it must be the assistant's answer"
    return None


def listed(header: str, problems: list[str]) -> str:
    """``header (N problems):`` and one ``•`` line per problem, the first few of them."""
    count = len(problems)
    lines = [f"{header} ({count} problem{'s' if count != 1 else ''}):"]
    lines += [f"  • {problem}" for problem in problems[:_SHOWN]]
    if count > _SHOWN:
        lines.append(f"  … and {count - _SHOWN} more")
    return "\n".join(lines)


def tokenize(tokenizer: Any, messages: list[Message]) -> Example:
    """The conversation's tokens and labels: the token ids on each assistant turn (its content
    and end-of-turn token), :data:`IGNORE` elsewhere.

    Raises:
        ConfigError: The chat template renders a conversation cut before an assistant turn as
            something other than a prefix of the whole one, so the turn cannot be located.
    """
    input_ids = _ids(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE] * len(input_ids)
    end_of_turn = tokenizer.eos_token_id
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _ids(tokenizer, messages[:index], generation_prompt=True)
        through = _ids(tokenizer, messages[: index + 1], generation_prompt=False)
        if through[: len(before)] != before or input_ids[: len(through)] != through:
            raise errors.ConfigError(
                f"the tokenizer's chat template does not render assistant turn {index + 1} after "
                "the conversation before it, so its tokens cannot be found",
                "Use a tokenizer whose chat template renders turns in order (ChatML, Llama, "
                "Mistral templates do).",
            )
        start = len(before)
        turn = through[start:]
        stop = start + (turn.index(end_of_turn) + 1 if end_of_turn in turn else len(turn))
        labels[start:stop] = input_ids[start:stop]
    return Example(
        input_ids=input_ids,
        labels=labels,
        prompt=json.dumps(messages[:-1], ensure_ascii=False),
        target=messages[-1]["content"],
    )


def _ids(tokenizer: Any, messages: list[Message], *, generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, tokenize=False
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def padded(example: Example, max_seq_len: int, pad_id: int) -> dict[str, Any]:
    """One row of one conversation, right-padded to ``max_seq_len`` (labels :data:`IGNORE` and
    attention 0 on the padding)."""
    length = len(example.input_ids)
    pad = max_seq_len - length
    return {
        "input_ids": example.input_ids + [pad_id] * pad,
        "labels": example.labels + [IGNORE] * pad,
        "attention_mask": [1] * length + [0] * pad,
        "prompt": example.prompt,
        "target": example.target,
    }


def packed(examples: list[Example], max_seq_len: int, pad_id: int) -> list[dict[str, Any]]:
    """Rows holding consecutive conversations (each whole; a row is closed when the next one
    does not fit), right-padded to ``max_seq_len``.

    ``position_ids`` restart at 0 at each conversation (and at the padding). transformers'
    models (``masking_utils.find_packed_sequence_indices``) read a restart as a sequence
    boundary and keep attention inside each conversation when they are given ``position_ids``,
    no ``attention_mask`` and ``use_cache=False`` (with a cache they do not look), so
    conversations packed together never see each other. ``attention_mask`` (1 on
    conversations, 0 on padding) is kept for trainers that use it instead: with it, a
    conversation attends to the earlier ones in its row, as in many trainers' packing.
    """
    rows: list[dict[str, Any]] = []
    current: list[Example] = []
    for example in examples:
        if (
            current
            and sum(len(e.input_ids) for e in current) + len(example.input_ids) > max_seq_len
        ):
            rows.append(_packed_row(current, max_seq_len, pad_id))
            current = []
        current.append(example)
    if current:
        rows.append(_packed_row(current, max_seq_len, pad_id))
    return rows


def _packed_row(examples: list[Example], max_seq_len: int, pad_id: int) -> dict[str, Any]:
    input_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for example in examples:
        input_ids += example.input_ids
        labels += example.labels
        positions += range(len(example.input_ids))
    length = len(input_ids)
    pad = max_seq_len - length
    return {
        "input_ids": input_ids + [pad_id] * pad,
        "labels": labels + [IGNORE] * pad,
        "attention_mask": [1] * length + [0] * pad,
        "position_ids": positions + list(range(pad)),
    }


def _plain(messages: list[dict[str, Any]]) -> list[Message]:
    # Only what the template and the prompt column need; other keys (name, ...) are dropped.
    return [{"role": m["role"], "content": m["content"]} for m in messages]
