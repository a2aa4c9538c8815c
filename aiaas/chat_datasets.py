"""Chat data sets: conversations tokenized with a causal LM's chat template, as Parquet splits.

The layout is every data set's (:mod:`aiaas.datasets`), with a :class:`ChatDatasetSchema`::

    datasets/<name>/schema.json
    datasets/<name>/<split>/part-00000.parquet ...

A row is one conversation padded to ``max_seq_len`` (see :mod:`aiaas.chat_tokens`):

    input_ids       list<int32>  the chat template's tokens of the conversation, then padding
    labels          list<int32>  input_ids on the assistant turns, -100 elsewhere
    attention_mask  list<int32>  1 on the conversation, 0 on the padding
    prompt          string       JSON of the messages before the final assistant turn
    target          string       the final assistant turn's content

With ``packing: true`` the train split's rows hold several conversations each, with
``position_ids`` (restarting at each conversation) instead of ``prompt`` and ``target``;
validation and test stay one conversation per row, so they are scored conversation by
conversation (loss, and exact match of a generated answer against ``target``).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel

from aiaas import chat_tokens, datasets, errors, skills
from aiaas.config.dataset import ChatSource, DatasetConfig, is_directory_reference
from aiaas.storage import Storage

_LISTS = ("input_ids", "labels", "attention_mask", "position_ids")


class ChatDatasetSchema(BaseModel):
    """What a fine-tuning job needs to know about a prepared chat data set."""

    kind: Literal["chat"] = "chat"
    name: str
    tokenizer: str  # whose tokenizer made the ids: the version ("smollm2:1") or a directory
    tokenizer_reference: str  # as the config wrote it, e.g. "smollm2@production"
    chat_template_sha256: str
    max_seq_len: int
    packing: bool
    pad_token_id: int
    columns: dict[str, list[str]]
    rows: dict[str, int]
    conversations: dict[str, int]  # as many as rows, except in a packed train split
    tokens: dict[str, int]  # conversation tokens, padding not counted
    label_tokens: dict[str, int]  # tokens with a loss: the assistant turns
    fingerprint: str
    source: str  # "chat"
    skill: str | None = None  # the generator, when the conversations were generated
    prepared_at: float


def load_chat_schema(storage: Storage, name: str) -> ChatDatasetSchema:
    """The schema of a prepared chat data set.

    Raises:
        ConfigError: The data set was never prepared, or it is a table data set.
    """
    text = datasets.read_schema_text(storage, name)
    if json.loads(text).get("kind", "table") != "chat":
        raise errors.ConfigError(
            f"data set '{name}' is a table data set, not a chat data set",
            "Fine-tuning needs conversations: a dataset config with source type 'chat'.",
        )
    return ChatDatasetSchema.model_validate_json(text)


def load_tokenizer(reference: str) -> tuple[Any, str]:
    """The tokenizer a config names, and what it is (the registry version, or the directory).

    A registry reference is resolved (MLFLOW_TRACKING_URI must point at the registry) and its
    Hugging Face directory fetched and checked against its manifest.

    Raises:
        ConfigError: No such directory or version, or the tokenizer has no chat template.
    """
    from transformers import AutoTokenizer

    from aiaas import causal_lm, registry

    if is_directory_reference(reference):
        directory = Path(reference).expanduser()
        if not (directory / "tokenizer_config.json").is_file():
            raise errors.ConfigError(
                f"tokenizer '{reference}' is not a Hugging Face directory with a tokenizer",
                "Point tokenizer at a model directory (with tokenizer_config.json), or name a "
                "registry version such as smollm2@production.",
            )
        described = str(directory.resolve())
    else:
        version = registry.resolve(registry.parse_ref(reference))
        directory = causal_lm.local_directory(version)
        described = f"{version.name}:{version.version}"
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if not tokenizer.chat_template or tokenizer.eos_token_id is None:
        raise errors.ConfigError(
            f"tokenizer '{reference}' has no chat template or no end-of-turn (eos) token",
            "Use an instruct (chat) model's tokenizer, e.g. smollm2@production.",
        )
    return tokenizer, described


def conversations(source: ChatSource, seed: int) -> tuple[list[chat_tokens.Conversation], str]:
    """The source's conversations, and how errors name where one came from."""
    if source.generator is not None:
        assert source.rows is not None  # the config requires rows with a generator
        generated = skills.generate(source.generator, source.rows, seed)
        for index, messages in enumerate(generated, start=1):
            problem = chat_tokens.conversation_problem(messages)
            if problem:  # a skill's bug, not the user's
                raise AssertionError(f"skill {source.generator}, conversation {index}: {problem}")
        found = [chat_tokens.Conversation(m, i) for i, m in enumerate(generated, start=1)]
        return found, f"generator '{source.generator}', conversation"
    assert source.path is not None
    return chat_tokens.read_jsonl(Path(source.path).expanduser(), source.path), "line"


def examples(
    config: DatasetConfig, tokenizer: Any, found: list[chat_tokens.Conversation], where: str
) -> list[chat_tokens.Example]:
    """Every conversation tokenized, each within ``max_seq_len`` (cut when ``truncate``).

    Raises:
        ConfigError: Conversations are longer than ``max_seq_len`` (listed by line), or a cut
            one has no assistant token left.
    """
    limit = config.max_seq_len
    made: list[chat_tokens.Example] = []
    problems: list[str] = []
    for conversation in found:
        example = chat_tokens.tokenize(tokenizer, conversation.messages)
        length = len(example.input_ids)
        if length > limit and config.truncate:
            cut = chat_tokens.Example(
                example.input_ids[:limit], example.labels[:limit], example.prompt, example.target
            )
            if all(label == chat_tokens.IGNORE for label in cut.labels):
                problems.append(
                    f"{where} {conversation.line}: no assistant token within max_seq_len {limit} "
                    f"({length} tokens)"
                )
            example = cut
        elif length > limit:
            problems.append(
                f"{where} {conversation.line}: {length} tokens, over max_seq_len {limit}"
            )
        made.append(example)
    if problems:
        raise errors.ConfigError(
            chat_tokens.listed(f"'{config.name}': conversations do not fit", problems),
            "Raise max_seq_len, shorten those conversations, or set truncate: true.",
        )
    return made


def prepare(config: DatasetConfig, storage: Storage) -> ChatDatasetSchema:
    """Tokenize the conversations, split them and write Parquet and the schema.

    Raises:
        ConfigError: Bad JSONL lines, conversations over ``max_seq_len``, an unusable tokenizer.
    """
    assert isinstance(config.source, ChatSource) and config.tokenizer is not None
    found, where = conversations(config.source, config.seed)
    tokenizer, described = load_tokenizer(config.tokenizer)
    made = examples(config, tokenizer, found, where)
    order = np.random.default_rng(config.seed).permutation(len(made))
    made = [made[i] for i in order]
    cut_train, cut_val = datasets.split_counts(len(made), config)
    parts = {
        "train": made[:cut_train],
        "validation": made[cut_train:cut_val],
        "test": made[cut_val:],
    }
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    digest = hashlib.sha256()
    columns: dict[str, list[str]] = {}
    rows: dict[str, int] = {}
    for split in datasets.SPLITS:
        if config.packing and split == "train":
            split_rows = chat_tokens.packed(parts[split], config.max_seq_len, pad_id)
        else:
            split_rows = [chat_tokens.padded(e, config.max_seq_len, pad_id) for e in parts[split]]
        columns[split] = list(split_rows[0])
        rows[split] = len(split_rows)
        _write_split(storage, config, split, split_rows, digest)
    schema = ChatDatasetSchema(
        name=config.name,
        tokenizer=described,
        tokenizer_reference=config.tokenizer,
        chat_template_sha256=hashlib.sha256(tokenizer.chat_template.encode()).hexdigest(),
        max_seq_len=config.max_seq_len,
        packing=config.packing,
        pad_token_id=int(pad_id),
        columns=columns,
        rows=rows,
        conversations={split: len(part) for split, part in parts.items()},
        tokens={split: sum(len(e.input_ids) for e in part) for split, part in parts.items()},
        label_tokens={
            split: sum(label != chat_tokens.IGNORE for e in part for label in e.labels)
            for split, part in parts.items()
        },
        fingerprint=digest.hexdigest()[:32],
        source=config.source.type,
        skill=config.source.generator,
        prepared_at=time.time(),
    )
    storage.write_text(datasets.schema_path(config.name), schema.model_dump_json(indent=2))
    return schema


def _write_split(
    storage: Storage,
    config: DatasetConfig,
    split: str,
    split_rows: list[dict[str, Any]],
    digest: hashlib._Hash,
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    filesystem, base = datasets.fresh_split(storage, config.name, split)
    names = list(split_rows[0])
    schema = pa.schema([(n, pa.list_(pa.int32()) if n in _LISTS else pa.string()) for n in names])
    for index, start in enumerate(range(0, len(split_rows), config.rows_per_file)):
        chunk = split_rows[start : start + config.rows_per_file]
        table = pa.Table.from_pylist(chunk, schema=schema)
        pq.write_table(table, f"{base}/part-{index:05d}.parquet", filesystem=filesystem)
        digest.update(split.encode())
        for name in names:
            values = [row[name] for row in chunk]
            if name in _LISTS:
                digest.update(np.asarray([len(v) for v in values], dtype=np.int64).tobytes())
                digest.update(np.concatenate(values).astype(np.int32).tobytes())
            else:
                digest.update(json.dumps(values, ensure_ascii=False).encode())
    digest.update(json.dumps(names).encode())
