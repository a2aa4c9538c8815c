"""The fine-tuning gate and registration against a registry of its own (no Ray): the base model
checked, greedy answers scored, the adapter registered as a version of its own model (adapter
files only) with lineage back to the base version, a restarted run registering nothing new, and a
failed gate registering nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import torch

from aiaas import adapters, aliases, artifacts, causal_lm, errors, model_card, registry, settings
from aiaas.config import loader
from aiaas.config.finetune import FinetuneConfig
from aiaas.storage import Storage
from jobs import (
    entrypoint,
    finetune_data,
    finetune_gate,
    finetune_loop,
    finetune_plan,
    finetune_trainer,
    finetune_weights,
    gate,
    outcomes,
    records,
)
from tests.unit import chat_data, local_registry

REPO = Path(__file__).resolve().parents[2]
TINY = Path("configs/finetune/tiny/smollm2_iso_dates_lora.yaml")


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chat_data.smollm2_directory(tmp_path_factory)


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory: pytest.TempPathFactory, hf: Path) -> Iterator[str]:
    """A registry holding smollm2 version 1 (imported from the directory) as production."""
    with local_registry.local_registry(tmp_path_factory) as uri, pytest.MonkeyPatch.context() as p:
        p.setenv(settings.MODEL_CACHE, str(tmp_path_factory.mktemp("cache")))
        settings.current.cache_clear()
        imported = causal_lm.import_model("smollm2", str(hf))
        aliases.promote("smollm2", imported.version, "production")
        yield uri


@pytest.fixture
def env(registry_uri: str, tmp_path_factory: pytest.TempPathFactory, monkeypatch: Any) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry_uri)
    monkeypatch.setenv(settings.MODEL_CACHE, str(tmp_path_factory.getbasetemp() / "cache0"))
    monkeypatch.setenv(settings.SUBMISSION_ID, "aiaas-finetune-tiny-test")
    settings.current.cache_clear()
    monkeypatch.setattr(gate, "ray_job_id", lambda: "02000000")
    return registry_uri


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, hf: Path) -> Path:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("storage")
    chat_data.write_dataset(root, AutoTokenizer.from_pretrained(hf))
    return root


def _config(**update: Any) -> FinetuneConfig:
    config = loader.load(REPO / TINY, FinetuneConfig)
    return config.model_copy(update=update)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, hf: Path, root: Path) -> Path:
    """A checkpoint as the workers write it after 4 steps of the tiny config."""
    config = _config()
    plan = finetune_plan.parallel_plan(config)
    torch.manual_seed(0)
    model = finetune_weights.build(config, hf)
    optimizer = finetune_weights.optimizer(config, model)
    split = root / "datasets/iso-dates"

    def batches(name: str, size: int) -> list[finetune_data.TokenBatch]:
        table = pd.read_parquet(split / name)
        return [
            finetune_data.TokenBatch.from_numpy(
                {c: table[c].to_numpy()[start : start + size] for c in finetune_data.TOKEN_COLUMNS}
            )
            for start in range(0, len(table), size)
        ]

    base_loss = finetune_loop.evaluate(model, iter(batches("validation", 2)), plan, 1)
    model.train()
    train = batches("train", 2)
    for step in range(4):
        group = train[(2 * step) % 6 : (2 * step) % 6 + 2]
        finetune_loop.optimizer_step(model, optimizer, group, world=1, plan=plan, max_grad_norm=1)
    eval_loss = finetune_loop.evaluate(model, iter(batches("validation", 2)), plan, 1)
    weights = finetune_weights.gather(
        model, optimizer, plan, finetune_weights.trainable_names(model)
    )
    directory = tmp_path_factory.mktemp("run") / "checkpoint_000002"
    directory.mkdir()
    finetune_weights.save(
        model,
        config,
        weights.model,
        finetune_weights.TrainerState(4, 1, base_loss, weights.optimizer, {}),
        {"step": 4, "epoch": 1, "eval_loss": eval_loss, "base_eval_loss": base_loss},
        directory,
        "smollm2:1",
    )
    return directory


def _prepared(root: Path, config: FinetuneConfig) -> finetune_trainer.Prepared:
    storage = Storage(str(root))
    base = finetune_trainer.resolve_base(config)
    data = finetune_data.describe(storage, config.dataset, config.max_seq_len)
    return finetune_trainer.Prepared(
        storage=storage,
        base=base,
        base_directory=causal_lm.local_directory(base),
        data=data,
        steps=finetune_plan.step_plan(config, data.rows["train"]),
    )


def _result(checkpoint: Path) -> Any:
    import ray.train

    reports = [
        {"step": 0, "epoch": 0, "eval_loss": 2.5, "base_eval_loss": 2.5},
        {"step": 2, "epoch": 0, "train_loss": 2.7, "base_eval_loss": 2.5, "tokens_per_s": 150.0},
        json.loads((checkpoint / finetune_weights.FIGURES).read_text()) | {"train_loss": 1.4},
    ]
    return SimpleNamespace(
        checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint)),
        metrics_dataframe=pd.DataFrame(reports),
    )


def _exact(prediction: str, target: str) -> bool:
    return " ".join(prediction.split()) == " ".join(target.split())


def test_the_base_must_be_a_causal_lm_with_the_targets_named(env: str, hf: Path) -> None:
    base = finetune_trainer.resolve_base(_config())
    assert (base.name, base.version, base.format) == ("smollm2", "1", "hf-causal-lm")
    with pytest.raises(errors.ConfigError) as unknown:
        finetune_trainer.resolve_base(_config(base_model="smollm2@staging"))
    assert str(unknown.value) == (
        "model 'smollm2' has no alias 'staging' (aliases: production)\n"
        "Set it with: aiaas models promote smollm2 VERSION --alias staging"
    )
    config = _config()
    wrong = config.model_copy(
        update={"lora": config.adapter.model_copy(update={"target_modules": ["q_proj", "qkv"]})}
    )
    with pytest.raises(errors.ConfigError) as caught:
        finetune_weights.check_targets(wrong, finetune_weights.skeleton(hf))
    assert str(caught.value) == (
        "lora.target_modules: qkv name no module of LlamaForCausalLM\n"
        "Use linear layers it has, e.g. q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
        "down_proj, lm_head."
    )


def test_a_passed_gate_registers_the_adapter_alone_with_lineage_to_its_base(
    env: str, root: Path, checkpoint: Path, hf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(finetune_gate, "skill_score", lambda: _exact)
    config = _config()
    prepared = _prepared(root, config)
    summary = outcomes.RunSummary(run=config.name, train_seconds=12.5)
    outcome = finetune_gate.evaluate_and_register(
        config, TINY, prepared, _result(checkpoint), summary
    )
    assert outcome.gate == "passed" and outcome.base == "smollm2:1"
    assert outcome.registered == outcomes.RegisteredVersion(model="tiny-smollm2-skill", version="1")
    figures = outcome.figures
    assert figures.test_rows == 4 and 0 <= figures.matched <= 4
    assert figures.eval_loss < figures.base_eval_loss
    assert [step.step for step in outcome.history] == [0, 2, 4]
    assert outcome.history[1].eval_loss is None and outcome.steps_run == 4

    version = registry.resolve(registry.parse_ref("tiny-smollm2-skill"), with_run=True)
    assert version.format == adapters.FORMAT and version.ready
    lineage = version.lineage
    schema = json.loads((root / "datasets/iso-dates/schema.json").read_text())
    assert {key: lineage[key] for key in ("parent", "base_model", "base_version")} == {
        "parent": "smollm2:1",
        "base_model": "smollm2",
        "base_version": "1",
    }
    assert lineage["base_reference"] == "smollm2@production"
    assert (lineage["dataset"], lineage["dataset_fingerprint"]) == (
        "iso-dates",
        schema["fingerprint"],
    )
    assert lineage["job_id"] == "aiaas-finetune-tiny-test" and lineage["ray_job_id"] == "02000000"
    assert lineage["config_hash"] == records.config_hash(config.model_dump(mode="json"))
    assert lineage["config_path"] == str(TINY) and lineage["checkpoint"] == str(checkpoint)
    assert lineage["lora"] == "rank 8, alpha 16, dropout 0, targets q_proj,k_proj,v_proj,o_proj"
    assert lineage["exact_match"] == f"{figures.exact_match:.4f} ({figures.matched}/4)"
    assert float(lineage["eval_loss"]) == figures.eval_loss
    assert version.metrics["test_exact_match"] == figures.exact_match
    assert version.metrics["eval_loss"] == pytest.approx(figures.eval_loss)

    # The artifact: the adapter's two files and the registry's records, no base weights.
    local = artifacts.verified_copy(version)
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert files == [
        "MLmodel",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "aiaas_manifest.json",
    ]
    assert sum((local / name).stat().st_size for name in files) < 5_000_000
    adapter = adapters.local_directory(version)
    loaded = adapters.load(hf, adapter)
    trained = finetune_weights.load_trained(config, hf, checkpoint)
    ids = torch.tensor([[1, 9690, 198, 2683, 359]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, trained(ids).logits, atol=1e-5)

    # `models show` walks from the adapter to the version it needs.
    chain = model_card.lineage(version)
    assert [(step.model, step.version, step.format) for step in chain] == [
        ("tiny-smollm2-skill", "1", "hf-lora-adapter"),
        ("smollm2", "1", "hf-causal-lm"),
    ]

    # A finished run started again judges the same checkpoint and makes no second version.
    again = finetune_gate.evaluate_and_register(
        config, TINY, prepared, _result(checkpoint), summary
    )
    assert again.registered == outcomes.RegisteredVersion(
        model="tiny-smollm2-skill", version="1", already=True
    )
    assert [v.version for v in registry.versions("tiny-smollm2-skill")] == ["1"]


def test_a_failed_gate_registers_nothing_and_says_by_how_much(
    env: str, root: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(finetune_gate, "skill_score", lambda: lambda prediction, target: False)
    config = _config()
    assert config.registration is not None
    registration = config.registration.model_copy(
        update={
            "model": "tiny-gate-miss",
            "gate": config.registration.gate.model_copy(update={"min_exact_match": 0.5}),
        }
    )
    config = config.model_copy(update={"registration": registration})
    with pytest.raises(entrypoint.GateFailed) as caught:
        finetune_gate.evaluate_and_register(
            config,
            TINY,
            _prepared(root, config),
            _result(checkpoint),
            outcomes.RunSummary(run=config.name),
        )
    assert str(caught.value) == (
        "registration gate failed: test exact match 0.0000 (0 of 4) is not >= 0.5; nothing was "
        "registered"
    )
    outcome = caught.value.outcome
    assert isinstance(outcome, outcomes.FinetuneOutcome) and outcome.registered is None
    assert outcome.gate == "failed: test exact match 0.0000 (0 of 4) is not >= 0.5"
    assert registry.versions("tiny-gate-miss") == []


def test_greedy_answers_are_the_same_every_time(hf: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf)
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Say hello."}],
        [{"role": "user", "content": "What is the capital of France? One word."}],
    ]
    first = finetune_gate.answers(model, tokenizer, conversations, 12, batch=2)
    assert len(first) == 3 and "Paris" in first[0]
    assert finetune_gate.answers(model, tokenizer, conversations, 12, batch=2) == first
