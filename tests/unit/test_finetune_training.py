"""Fine-tuning the real SmolLM2 on a tiny tokenized chat data set, without a Ray cluster: the data
set's checks, the loss on target tokens only, gradient accumulation, LoRA learning, checkpoints
that hold the adapter alone, and the workers' loop (with Ray Train's calls faked) reporting,
checkpointing and resuming where it stopped."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from aiaas import adapters, errors
from aiaas.config import loader
from aiaas.config.finetune import FinetuneConfig, OptimizerSpec
from aiaas.storage import Storage
from jobs import finetune_data, finetune_loop, finetune_plan, finetune_weights
from tests.unit import chat_data

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/finetune/tiny/smollm2_iso_dates_lora.yaml"
PIN = {
    "model": "smollm2",
    "version": "1",
    "run_id": "r1",
    "source": "mlflow-artifacts:/1",
    "format": "hf-causal-lm",
    "artifact_sha256": "0" * 64,
    "created": "0",
}


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chat_data.smollm2_directory(tmp_path_factory)


@pytest.fixture(scope="module")
def tokenizer(hf: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """A storage root with the data set ``iso-dates`` (12 train, 4 validation, 4 test rows)."""
    root = tmp_path_factory.mktemp("storage")
    chat_data.write_dataset(root, tokenizer)
    return root


@pytest.fixture
def config() -> FinetuneConfig:
    return loader.load(TINY, FinetuneConfig)


def _batch(root: Path, split: str, rows: slice) -> finetune_data.TokenBatch:
    table = pq.read_table(root / "datasets/iso-dates" / split).slice(
        rows.start, rows.stop - rows.start
    )
    return finetune_data.TokenBatch.from_numpy(
        {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    )


def test_the_chat_data_set_is_described_and_checked(root: Path, tokenizer: Any) -> None:
    storage = Storage(str(root))
    data = finetune_data.describe(storage, "iso-dates", 512)
    schema = json.loads((root / "datasets/iso-dates/schema.json").read_text())
    assert data.rows == {"train": 12, "validation": 4, "test": 4}
    assert (data.fingerprint, data.sequence_length, data.packed) == (
        schema["fingerprint"],
        96,
        False,
    )
    assert finetune_data.template_problem(data, tokenizer.chat_template, "smollm2:1") is None
    assert finetune_data.template_problem(data, "{{ other }}", "smollm2:2") == (
        "data set 'iso-dates' was tokenized with the chat template of smollm2:1, not smollm2:2's"
    )
    prompts = finetune_data.test_prompts(storage, "iso-dates", 2)
    assert prompts[0] == (chat_data.sums(1, 16)[0][:1], chat_data.sums(1, 16)[0][1]["content"])
    with pytest.raises(errors.ConfigError) as long:
        finetune_data.describe(storage, "iso-dates", 64)
    assert str(long.value) == (
        "data set 'iso-dates' is tokenized to 96 tokens per row, but max_seq_len is 64\n"
        "Set max_seq_len: 96, or prepare the data set with max_seq_len 64."
    )
    with pytest.raises(errors.ConfigError) as missing:
        finetune_data.describe(storage, "nope", 512)
    assert str(missing.value) == (
        f"data set 'nope' is not prepared under {root}\n"
        "Prepare it first: aiaas data prepare configs/data/nope.yaml"
    )


def test_a_split_without_labels_or_a_table_data_set_is_refused(
    tmp_path: Path, tokenizer: Any
) -> None:
    directory = chat_data.write_dataset(tmp_path, tokenizer, name="broken")
    table = pq.read_table(directory / "validation").drop_columns(["labels"])
    pq.write_table(table, directory / "validation/part-00000.parquet")
    with pytest.raises(errors.ConfigError) as caught:
        finetune_data.describe(Storage(str(tmp_path)), "broken", 512)
    assert str(caught.value).splitlines()[0] == (
        "the validation split of data set 'broken' has no column labels (it has "
        "attention_mask, input_ids, prompt, target)"
    )
    schema = json.loads((directory / "schema.json").read_text())
    (directory / "schema.json").write_text(json.dumps({**schema, "kind": "table"}))
    with pytest.raises(errors.ConfigError) as table_kind:
        finetune_data.describe(Storage(str(tmp_path)), "broken", 512)
    assert str(table_kind.value).startswith(
        "data set 'broken' is a table data set, not a chat data set"
    )


def test_token_batches_are_cut_to_their_longest_row(root: Path) -> None:
    table = pq.read_table(root / "datasets/iso-dates/train").slice(0, 3)
    lists = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    arrays = {name: np.stack(list(lists[name])) for name in finetune_data.TOKEN_COLUMNS}
    from_lists = finetune_data.TokenBatch.from_numpy(lists)
    from_arrays = finetune_data.TokenBatch.from_numpy(arrays)  # Ray Data's 2-D form
    longest = int(np.stack(list(lists["attention_mask"])).sum(1).max())
    assert from_lists.input_ids.shape == (3, longest) and from_lists.input_ids.dtype == torch.int64
    assert torch.equal(from_lists.labels, from_arrays.labels)
    assert from_lists.model_inputs().keys() == {"input_ids", "attention_mask"}
    labelled = int((np.stack(list(lists["labels"])) != chat_data.IGNORE).sum())
    assert from_lists.target_tokens() == labelled
    assert from_lists.tokens() == int(np.stack(list(lists["attention_mask"])).sum())


@pytest.fixture
def lora(config: FinetuneConfig, hf: Path) -> Any:
    torch.manual_seed(0)
    return finetune_weights.build(config, hf)


def test_the_loss_counts_the_answer_tokens_only(lora: Any, root: Path, tokenizer: Any) -> None:
    batch = _batch(root, "train", slice(0, 2))
    lora.eval()
    with torch.no_grad():
        loss, count = finetune_loop.token_loss(lora, batch)
        reference = lora(**batch.model_inputs(), labels=batch.labels).loss  # transformers' mean
    answers = [messages[-1]["content"] for messages in chat_data.sums(2)]
    # Each answer's tokens and its end-of-turn token; nothing of the prompt or the padding.
    expected = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)
    assert int(count) == expected == batch.target_tokens()
    assert float(loss / count) == pytest.approx(float(reference), rel=1e-5)
    # Labels on the padding never count, whatever they say.
    noisy = finetune_data.TokenBatch(
        batch.input_ids,
        batch.labels.masked_fill(batch.attention_mask == 0, 7),
        batch.attention_mask,
    )
    with torch.no_grad():
        noisy_loss, noisy_count = finetune_loop.token_loss(lora, noisy)
    assert (float(noisy_loss), int(noisy_count)) == (float(loss), int(count))
    prompt_only = finetune_data.TokenBatch(
        batch.input_ids, torch.full_like(batch.labels, chat_data.IGNORE), batch.attention_mask
    )
    with torch.no_grad():
        none_loss, none_count = finetune_loop.token_loss(lora, prompt_only)
    assert (float(none_loss), int(none_count)) == (0.0, 0)


def _padded(batch: finetune_data.TokenBatch, length: int) -> finetune_data.TokenBatch:
    pad = length - batch.input_ids.shape[1]

    def grow(tensor: Any, value: int) -> Any:
        return torch.nn.functional.pad(tensor, (0, pad), value=value)

    return finetune_data.TokenBatch(
        grow(batch.input_ids, 2), grow(batch.labels, -100), grow(batch.attention_mask, 0)
    )


def _trainable(model: Any) -> dict[str, Any]:
    return {
        name: parameter.detach().clone()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def test_accumulated_micro_batches_make_the_step_of_one_batch(
    lora: Any, config: FinetuneConfig, root: Path
) -> None:
    sgd = config.model_copy(
        update={"optimizer": OptimizerSpec(name="sgd", lr=1.0, momentum=0.0, max_grad_norm=None)}
    )
    plan = finetune_plan.parallel_plan(sgd)
    with torch.no_grad():  # B starts at 0, which leaves A without a gradient: move it off 0
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    start = _trainable(lora)
    # Two micro-batches with different numbers of answer tokens (2-digit and 3-digit sums).
    first, second = _batch(root, "train", slice(0, 1)), _batch(root, "train", slice(11, 12))
    assert first.target_tokens() != second.target_tokens()

    def delta(group: list[finetune_data.TokenBatch]) -> dict[str, Any]:
        with torch.no_grad():
            for name, parameter in lora.named_parameters():
                if name in start:
                    parameter.copy_(start[name])
        optimizer = finetune_weights.optimizer(sgd, lora)
        finetune_loop.optimizer_step(lora, optimizer, group, world=1, plan=plan, max_grad_norm=None)
        return {name: value - start[name] for name, value in _trainable(lora).items()}

    lora.train()
    accumulated = delta([first, second])
    length = max(first.input_ids.shape[1], second.input_ids.shape[1])
    a, b = _padded(first, length), _padded(second, length)
    whole = finetune_data.TokenBatch(
        torch.cat([a.input_ids, b.input_ids]),
        torch.cat([a.labels, b.labels]),
        torch.cat([a.attention_mask, b.attention_mask]),
    )
    at_once = delta([whole])
    assert max(float(v.abs().max()) for v in at_once.values()) > 0
    for name, value in accumulated.items():
        scale = float(at_once[name].abs().max())
        assert float((value - at_once[name]).abs().max()) <= 1e-3 * scale, (
            name,
            float((value - at_once[name]).abs().max()),
            scale,
        )


def test_a_few_lora_steps_lower_the_loss_on_a_repeated_batch(
    lora: Any, config: FinetuneConfig, root: Path
) -> None:
    plan = finetune_plan.parallel_plan(config)
    optimizer = finetune_weights.optimizer(config, lora)
    batch = _batch(root, "train", slice(0, 2))
    lora.train()
    losses = []
    for _ in range(6):
        done = finetune_loop.optimizer_step(
            lora, optimizer, [batch], world=1, plan=plan, max_grad_norm=1.0
        )
        losses.append(done.loss_sum / done.target_tokens)
    assert losses[-1] < 0.7 * losses[0], losses
    frozen = [name for name, p in lora.named_parameters() if not p.requires_grad]
    assert all("lora_" not in name for name in frozen) and len(frozen) > 200


def _steps(lora: Any, config: FinetuneConfig, batch: finetune_data.TokenBatch, n: int) -> Any:
    plan = finetune_plan.parallel_plan(config)
    optimizer = finetune_weights.optimizer(config, lora)
    lora.train()
    for _ in range(n):
        finetune_loop.optimizer_step(lora, optimizer, [batch], world=1, plan=plan, max_grad_norm=1)
    return optimizer


def _logits(model: Any, batch: finetune_data.TokenBatch) -> Any:
    model.eval()
    with torch.no_grad():
        return model(**batch.model_inputs()).logits


def test_a_checkpoint_holds_the_adapter_only_and_restores_exactly(
    lora: Any, config: FinetuneConfig, hf: Path, root: Path, tmp_path: Path
) -> None:
    plan = finetune_plan.parallel_plan(config)
    batch = _batch(root, "train", slice(0, 2))
    optimizer = _steps(lora, config, batch, 2)
    trainable = finetune_weights.trainable_names(lora)
    weights = finetune_weights.gather(lora, optimizer, plan, trainable)
    assert set(weights.model) == trainable and all("lora_" in name for name in trainable)
    state = finetune_weights.TrainerState(
        step=2, epoch=0, base_eval_loss=2.5, optimizer=weights.optimizer, scheduler={}
    )
    finetune_weights.save(
        lora, config, weights.model, state, {"step": 2, "eval_loss": 1.0}, tmp_path, "smollm2:1"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter",
        "figures.json",
        "trainer_state.pt",
    ]
    adapter = tmp_path / "adapter"
    assert adapters.problem(adapter) is None
    size = sum(path.stat().st_size for path in adapter.iterdir())
    assert size < 5_000_000  # ~0.9M float32 weights, never the 538 MB base
    written = json.loads((adapter / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == "smollm2:1" and written["r"] == 8
    assert set(written["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert finetune_weights.read_figures(tmp_path) == {"step": 2, "eval_loss": 1.0}

    restored, loaded = finetune_weights.restore(config, hf, tmp_path)
    assert (loaded.step, loaded.base_eval_loss) == (2, 2.5)
    assert torch.allclose(_logits(restored, batch), _logits(lora, batch), atol=1e-5)
    again = finetune_weights.optimizer(config, restored)
    finetune_weights.load_optimizer(restored, again, loaded.optimizer, plan)
    before = {
        name: optimizer.state[p]["exp_avg"]
        for name, p in lora.named_parameters()
        if p.requires_grad
    }
    after = {
        name: again.state[p]["exp_avg"]
        for name, p in restored.named_parameters()
        if p.requires_grad
    }
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    merged = finetune_weights.load_trained(config, hf, tmp_path)
    assert torch.allclose(_logits(merged, batch), _logits(lora, batch), atol=1e-4)


def test_adapter_directories_with_anything_else_are_refused(
    lora: Any, config: FinetuneConfig, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    lora.save_pretrained(str(tmp_path), save_embedding_layers=False)
    assert adapters.problem(tmp_path) == (
        "holds README.md, adapter_config.json, adapter_model.safetensors instead of "
        "adapter_config.json, adapter_model.safetensors"
    )
    (tmp_path / "README.md").unlink()
    save_file(
        {"model.embed_tokens.weight": torch.zeros(2, 2)}, str(tmp_path / adapters.WEIGHTS_FILE)
    )
    assert adapters.problem(tmp_path) == (
        "adapter_model.safetensors holds 1 tensors that are no LoRA matrix "
        "(model.embed_tokens.weight)"
    )


def test_a_full_fine_tune_checkpoints_the_whole_model(
    config: FinetuneConfig, hf: Path, root: Path, tmp_path: Path
) -> None:
    full = loader.load(REPO / "configs/finetune/tiny/smollm2_iso_dates_full.yaml", FinetuneConfig)
    full = full.model_copy(update={"optimizer": OptimizerSpec(name="sgd", lr=1e-4, momentum=0.0)})
    model = finetune_weights.build(full, hf)
    batch = _batch(root, "train", slice(0, 2))
    optimizer = _steps(model, full, batch, 1)
    plan = finetune_plan.parallel_plan(full)
    weights = finetune_weights.gather(
        model, optimizer, plan, finetune_weights.trainable_names(model)
    )
    state = finetune_weights.TrainerState(1, 0, 2.5, weights.optimizer, {})
    finetune_weights.save(model, full, weights.model, state, {"step": 1}, tmp_path, "smollm2:1")
    assert (tmp_path / "model/model.safetensors").is_file()
    restored, loaded = finetune_weights.restore(full, hf, tmp_path)
    assert loaded.step == 1
    assert torch.allclose(_logits(restored, batch), _logits(model, batch), atol=1e-5)


class _Shard:
    """A Ray Data shard of one split, as the loop iterates it (seeded local shuffle)."""

    def __init__(self, path: Path) -> None:
        self.table = pq.read_table(path, columns=list(finetune_data.TOKEN_COLUMNS))
        self.epochs = 0

    def iter_batches(
        self,
        *,
        batch_size: int,
        batch_format: str,
        drop_last: bool = False,
        local_shuffle_buffer_size: int | None = None,
        local_shuffle_seed: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        assert batch_format == "numpy"
        self.epochs += 1
        rows = len(self.table)
        order = np.arange(rows)
        if local_shuffle_seed is not None:
            order = np.random.default_rng(local_shuffle_seed).permutation(rows)
        for start in range(0, rows, batch_size):
            index = order[start : start + batch_size]
            if drop_last and len(index) < batch_size:
                return
            taken = self.table.take(pa.array(index))
            yield {
                name: taken.column(name).to_numpy(zero_copy_only=False)
                for name in taken.column_names
            }


class _Context:
    def get_world_rank(self) -> int:
        return 0

    def get_world_size(self) -> int:
        return 1


class _Gauges:
    def __init__(self, config: Any) -> None:
        pass

    def record(self, figures: dict[str, Any], seconds: float) -> None:
        assert figures["train_loss"] > 0


def _run_worker(
    monkeypatch: pytest.MonkeyPatch,
    config: FinetuneConfig,
    hf: Path,
    root: Path,
    checkpoint: Any,
) -> list[tuple[dict[str, Any], str | None]]:
    """One worker's whole loop with Ray Train's calls faked; returns its reports."""
    import ray.train
    import ray.train.torch

    from aiaas import causal_lm

    reports: list[tuple[dict[str, Any], str | None]] = []
    prepared: list[dict[str, Any]] = []
    shards = {
        split: _Shard(root / "datasets/iso-dates" / split) for split in ("train", "validation")
    }

    def report(metrics: dict[str, Any], checkpoint: Any = None, **_: Any) -> None:
        reports.append((dict(metrics), checkpoint.path if checkpoint else None))

    def prepare_model(model: Any, **kwargs: Any) -> Any:
        prepared.append(kwargs)
        return model

    monkeypatch.setattr(ray.train, "get_context", _Context)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: checkpoint)
    monkeypatch.setattr(ray.train, "get_dataset_shard", shards.__getitem__)
    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train.torch, "prepare_model", prepare_model)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(causal_lm, "local_directory", lambda version: hf)
    monkeypatch.setattr(finetune_loop, "_Gauges", _Gauges)
    steps = finetune_plan.step_plan(config, 12)
    args = finetune_loop.LoopArgs(config=config, base=PIN, steps=steps)
    finetune_loop.finetune_loop(args.loop_config())
    assert prepared == [{"parallel_strategy": "ddp"}]
    return reports


def _adapter(directory: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "adapter" / adapters.WEIGHTS_FILE))


def test_the_worker_loop_reports_checkpoints_and_resumes_where_it_stopped(
    monkeypatch: pytest.MonkeyPatch,
    config: FinetuneConfig,
    hf: Path,
    root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import ray.train

    from aiaas import progress

    # 12 rows, batches of 2, 2 per step: 3 steps an epoch, 4 steps, so step 2 is mid-epoch.
    assert finetune_plan.step_plan(config, 12).steps_per_epoch == 3
    reports = _run_worker(monkeypatch, config, hf, root, checkpoint=None)
    try:
        assert [(int(m["step"]), path is not None) for m, path in reports] == [
            (0, False),
            (2, True),
            (4, True),
        ]
        base = reports[0][0]["eval_loss"]
        assert all(m["base_eval_loss"] == base for m, _ in reports)
        last = reports[-1][0]
        assert last["eval_loss"] < base  # the adapter learned the skill's answers
        assert last["epoch"] == 1 and last["tokens_per_s"] > 0 and 0 < last["lr"] < 0.002
        middle = reports[1][1]
        assert middle is not None
        assert finetune_weights.read_figures(Path(middle))["step"] == 2

        # The worker group dies after step 2; the new one starts from that checkpoint.
        capsys.readouterr()
        resumed = _run_worker(
            monkeypatch, config, hf, root, checkpoint=ray.train.Checkpoint.from_directory(middle)
        )
        events = list(progress.events(capsys.readouterr().out.splitlines()))
        assert {"resumed_from_step": 2} in events
        assert [(int(m["step"]), path is not None) for m, path in resumed] == [(4, True)]
        assert resumed[0][0]["base_eval_loss"] == base
        assert resumed[0][0]["train_loss"] == pytest.approx(last["train_loss"], rel=1e-5)
        original, again = _adapter(str(reports[-1][1])), _adapter(str(resumed[0][1]))
        assert original.keys() == again.keys()
        for name in original:
            assert torch.allclose(original[name], again[name], atol=1e-6), name
    finally:
        for _, path in reports + (resumed if "resumed" in locals() else []):
            if path:
                shutil.rmtree(path, ignore_errors=True)
