"""The chat data set as a fine-tuning run reads it: checked splits, token batches, test prompts.

A prepared chat data set (``aiaas data prepare`` of a chat source) holds, per split, rows of
``input_ids``, ``labels`` (-100 where no loss) and ``attention_mask``, right-padded to the data
set's ``max_seq_len``; a packed train split adds ``position_ids`` (restarting at each
conversation); validation and test rows add ``prompt`` (JSON of the messages before the final
assistant turn) and ``target`` (that turn's text). ``schema.json`` records the fingerprint, the
tokenizer and its chat template's digest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel

from aiaas import datasets, errors
from aiaas.storage import Storage

#: The token columns every split has, and the packed train split's extra one.
TOKEN_COLUMNS = ("input_ids", "labels", "attention_mask")
POSITIONS = "position_ids"
#: The test split's columns the exact-match gate reads.
PROMPT_COLUMNS = ("prompt", "target")
#: The label of a token without a loss (the prompt, padding), as PyTorch's cross-entropy skips.
IGNORE_INDEX = -100


class ChatData(BaseModel):
    """What the driver knows of a chat data set before training."""

    name: str
    fingerprint: str
    rows: dict[str, int]
    sequence_length: int
    packed: bool
    tokenizer: str | None = None
    chat_template_sha256: str | None = None


def describe(storage: Storage, name: str, max_seq_len: int) -> ChatData:
    """Check a prepared chat data set's splits and describe them.

    Raises:
        ConfigError: The data set is not prepared, is a table data set, lacks a column, or was
            tokenized to rows longer than ``max_seq_len``.
    """
    import pyarrow

    text = storage.read_text(datasets.schema_path(name))
    if text is None:
        raise errors.ConfigError(
            f"data set '{name}' is not prepared under {storage.root}",
            f"Prepare it first: aiaas data prepare configs/data/{name}.yaml",
        )
    schema = json.loads(text)
    if schema.get("kind", "table") != "chat":
        raise errors.ConfigError(
            f"data set '{name}' is a table data set, not a chat data set",
            "Fine-tuning needs conversations: a dataset config with source type 'chat'.",
        )
    rows: dict[str, int] = {}
    length = 0
    packed = False
    for split in datasets.SPLITS:
        try:
            found = _dataset(storage, name, split)
            columns = set(found.schema.names)
            rows[split] = found.count_rows()
        except (pyarrow.ArrowException, OSError) as exc:
            raise errors.ConfigError(
                f"the {split} split of data set '{name}' cannot be read: "
                f"{str(exc).strip().splitlines()[-1][:300]}",
                f"Prepare it again: aiaas data prepare configs/data/{name}.yaml",
            ) from None
        needed = set(TOKEN_COLUMNS) | (set(PROMPT_COLUMNS) if split == "test" else set())
        missing = sorted(needed - columns)
        if missing:
            raise errors.ConfigError(
                f"the {split} split of data set '{name}' has no column {', '.join(missing)} "
                f"(it has {', '.join(sorted(columns))})",
                "Fine-tuning reads a chat data set: prepare one from a chat source.",
            )
        packed = packed or (split == "train" and POSITIONS in columns)
        if rows[split]:
            first = found.head(1, columns=["input_ids"]).column("input_ids")[0].as_py()
            length = max(length, len(first))
        elif split != "test":
            raise errors.ConfigError(
                f"the {split} split of data set '{name}' is empty",
                "Prepare more conversations, or larger split fractions.",
            )
    if length > max_seq_len:
        raise errors.ConfigError(
            f"data set '{name}' is tokenized to {length} tokens per row, but max_seq_len is "
            f"{max_seq_len}",
            f"Set max_seq_len: {length}, or prepare the data set with max_seq_len {max_seq_len}.",
        )
    return ChatData(
        name=name,
        fingerprint=str(schema.get("fingerprint") or _files_digest(storage, name)),
        rows=rows,
        sequence_length=length,
        packed=packed,
        tokenizer=schema.get("tokenizer"),
        chat_template_sha256=schema.get("chat_template_sha256"),
    )


def template_problem(data: ChatData, chat_template: str, base: str) -> str | None:
    """Why the base model's tokenizer does not fit the data set's token ids, or None."""
    recorded = data.chat_template_sha256
    if recorded and recorded != hashlib.sha256(chat_template.encode()).hexdigest():
        return (
            f"data set '{data.name}' was tokenized with the chat template of "
            f"{data.tokenizer or 'another tokenizer'}, not {base}'s"
        )
    return None


def test_prompts(storage: Storage, name: str, rows: int) -> list[tuple[list[dict[str, Any]], str]]:
    """The first ``rows`` test conversations (files in name order): messages and target."""
    table = _dataset(storage, name, "test").head(rows, columns=list(PROMPT_COLUMNS))
    prompts = table.column("prompt").to_pylist()
    targets = table.column("target").to_pylist()
    return [(json.loads(p), str(t)) for p, t in zip(prompts, targets, strict=True)]


def split_path(storage: Storage, name: str, split: str) -> str:
    """The directory of one split, as Ray Data reads it."""
    return datasets.split_path(storage, name, split)


@dataclass(frozen=True)
class TokenBatch:
    """One micro-batch of token rows as tensors (``[batch, tokens]``, int64)."""

    input_ids: Any
    labels: Any
    attention_mask: Any
    position_ids: Any = None

    @classmethod
    def from_numpy(cls, batch: dict[str, Any]) -> TokenBatch:
        """A Ray Data (or pyarrow) numpy batch, whose list columns arrive as 2-D arrays or as
        arrays of row arrays, as tensors cut to the longest row."""
        import torch

        def tensor(column: str) -> Any:
            rows = np.stack(list(batch[column])).astype(np.int64, copy=False)
            return torch.from_numpy(np.ascontiguousarray(rows))

        positions = tensor(POSITIONS) if POSITIONS in batch else None
        made = cls(tensor("input_ids"), tensor("labels"), tensor("attention_mask"), positions)
        return made.trimmed()

    def trimmed(self) -> TokenBatch:
        """Without the columns that are padding in every row (rows are right-padded), so a
        batch of short conversations costs their length, not ``max_seq_len``."""
        used = self.attention_mask.any(dim=0).nonzero()
        length = int(used[-1]) + 1 if len(used) else 1
        if length == self.input_ids.shape[1]:
            return self
        return TokenBatch(
            self.input_ids[:, :length],
            self.labels[:, :length],
            self.attention_mask[:, :length],
            None if self.position_ids is None else self.position_ids[:, :length],
        )

    def to(self, device: Any) -> TokenBatch:
        """The batch on ``device``."""
        positions = None if self.position_ids is None else self.position_ids.to(device)
        return TokenBatch(
            self.input_ids.to(device),
            self.labels.to(device),
            self.attention_mask.to(device),
            positions,
        )

    def model_inputs(self) -> dict[str, Any]:
        """The forward pass's arguments. Packed rows give ``position_ids`` and no attention
        mask: transformers then keeps attention inside each conversation of a row."""
        if self.position_ids is not None:
            return {"input_ids": self.input_ids, "position_ids": self.position_ids}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def tokens(self) -> int:
        """Tokens of the conversations (padding not counted)."""
        return int(self.attention_mask.sum())

    def target_tokens(self) -> int:
        """Tokens whose prediction is trained (label set, next-token shift applied)."""
        return int((self.shifted_labels() != IGNORE_INDEX).sum())

    def shifted_labels(self) -> Any:
        """The label of the next token at each position: what the logits there predict;
        padding never has a loss, whatever its label says."""
        labels = self.labels.masked_fill(self.attention_mask == 0, IGNORE_INDEX)
        return labels[:, 1:]


def _dataset(storage: Storage, name: str, split: str) -> Any:
    import pyarrow.dataset as pads
    from pyarrow import fs as pafs

    path = datasets.split_path(storage, name, split)
    filesystem, base = (
        pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    )
    return pads.dataset(base, filesystem=filesystem, format="parquet")


def _files_digest(storage: Storage, name: str) -> str:
    """A fingerprint from the split files' bytes, for a schema that records none."""
    digest = hashlib.sha256()
    for split in datasets.SPLITS:
        found = _dataset(storage, name, split)
        for path in sorted(found.files):
            with found.filesystem.open_input_stream(path) as stream:
                digest.update(split.encode())
                digest.update(hashlib.sha256(stream.read()).digest())
    return digest.hexdigest()[:32]
