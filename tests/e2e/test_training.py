"""Training jobs on the real cluster: submit, follow, register with lineage, records, bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from aiaas import progress
from tests import support
from tests.e2e.conftest import (
    RunningCluster,
    aiaas_cli,
    kill_a_train_worker_node,
    mlflow_uri,
    ray_job_logs,
    storage_root,
    variant,
)


def _submit(cluster: RunningCluster, path: Path) -> str:
    submitted = aiaas_cli(cluster, "train", str(path))
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.split("Submitted ", 1)[1].split()[0]


def test_prepared_digits_splits_are_parquet_with_a_schema(digits: RunningCluster) -> None:
    root = storage_root(digits) / "datasets" / "digits"
    schema = json.loads((root / "schema.json").read_text())
    assert schema["rows"] == {"train": 1257, "validation": 269, "test": 271}
    assert schema["num_classes"] == 10 and schema["feature_shape"] == [1, 8, 8]
    train = pd.read_parquet(root / "train")
    assert len(train) == 1257 and list(train.columns[-1:]) == ["label"]
    assert len(schema["fingerprint"]) == 32


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "accuracy"),
    [
        ("configs/train/tiny/digits_mlp.yaml", 0.5),
        ("configs/train/tiny/digits_cnn.yaml", 0.2),
        ("configs/train/digits_mlp.yaml", 0.95),
        ("configs/train/digits_cnn.yaml", 0.97),
    ],
)
def test_training_registers_one_version_with_lineage(
    digits: RunningCluster, config: str, accuracy: float
) -> None:
    result = aiaas_cli(digits, "train", config, "--follow")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "  epoch   1  train_loss" in result.stdout
    assert ": SUCCEEDED" in result.stdout
    submission_id = result.stdout.split("Submitted ", 1)[1].split()[0]
    model_name = yaml.safe_load(Path(support.REPO, config).read_text())["registration"][
        "model_name"
    ]
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri(digits))
    versions = client.search_model_versions(f"name='{model_name}'")
    assert len(versions) == 1
    tags = versions[0].tags
    assert tags["aiaas.job_id"] == submission_id
    schema = json.loads((storage_root(digits) / "datasets" / "digits" / "schema.json").read_text())
    assert tags["aiaas.dataset_fingerprint"] == schema["fingerprint"]
    assert tags["aiaas.ray_job_id"] and tags["aiaas.config_hash"]
    run = client.get_run(versions[0].run_id)
    assert run.data.metrics["test_accuracy"] >= accuracy
    # The job's record, as `aiaas jobs status` shows it.
    status = aiaas_cli(digits, "jobs", "status", submission_id, "--json")
    record = json.loads(status.stdout)
    assert record["status"] == "SUCCEEDED"
    assert record["result"]["registered"] == {"model": model_name, "version": versions[0].version}


@pytest.mark.slow
def test_failed_gate_registers_nothing_and_says_why(digits: RunningCluster, tmp_path: Path) -> None:
    config = yaml.safe_load((support.REPO / "configs/train/tiny/digits_mlp.yaml").read_text())
    config["name"] = "gate-miss"
    config["registration"] = {"model_name": "gate-miss", "gate": {"accuracy": ">= 0.9999"}}
    path = tmp_path / "gate.yaml"  # outside the project: staged under the storage root
    path.write_text(yaml.safe_dump(config))
    result = aiaas_cli(digits, "train", str(path), "--follow")
    assert result.returncode == 1
    assert "registration gate failed: test accuracy" in result.stdout + result.stderr
    assert "is not >= 0.9999; nothing was registered" in result.stdout + result.stderr
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri(digits))
    assert client.search_model_versions("name='gate-miss'") == []


@pytest.mark.slow
def test_ray_job_submit_runs_the_same_entrypoint(digits: RunningCluster) -> None:
    result = support.ray_job_submit(
        digits.dashboard_url,
        "python",
        "-m",
        "jobs.train",
        "configs/train/tiny/digits_mlp.yaml",
        ray_env=digits.ray_env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tiny-digits-mlp version" in result.stdout
    # The run already finished under this name: it resumes at its end and reuses its version.
    assert "Already registered as tiny-digits-mlp version 1" in result.stdout
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri(digits))
    assert len(client.search_model_versions("name='tiny-digits-mlp'")) == 1
    # The job recorded itself, so `aiaas jobs list` shows it beside aiaas's own submissions.
    listed = aiaas_cli(digits, "jobs", "list")
    line = next(row for row in listed.stdout.splitlines() if row.startswith("ray-"))
    assert "SUCCEEDED" in line and "registered tiny-digits-mlp" in line


@pytest.mark.slow
def test_stopped_job_is_stopped_and_registers_nothing(
    digits: RunningCluster, tmp_path: Path
) -> None:
    submission_id = _submit(
        digits, variant(tmp_path, "configs/train/tiny/digits_mlp.yaml", "to-stop", epochs=50)
    )
    deadline = time.monotonic() + 240
    # Epoch 1 reported means epoch 0's checkpoint is stored.
    while '"epoch": 1,' not in ray_job_logs(digits, submission_id):
        assert time.monotonic() < deadline, "the job never reached its second epoch"
        time.sleep(2)
    stopped = aiaas_cli(digits, "jobs", "stop", submission_id)
    assert stopped.returncode == 0, stopped.stderr
    assert f"{submission_id}: STOPPED" in stopped.stdout
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri(digits))
    assert client.search_model_versions("name='to-stop'") == []
    checkpoints = list((storage_root(digits) / "runs" / "to-stop").rglob("state.pt"))
    assert checkpoints, "checkpoints of a stopped run are kept"


def test_bad_inputs_fail_before_submission(digits: RunningCluster, tmp_path: Path) -> None:
    base = yaml.safe_load((support.REPO / "configs/train/tiny/digits_mlp.yaml").read_text())

    def attempt(**changes: object) -> str:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**base, **changes}))
        result = aiaas_cli(digits, "train", str(path))
        assert result.returncode == 1, result.stdout
        assert "Submitted" not in result.stdout and "Traceback" not in result.stderr
        return result.stderr

    assert "model.name (line" in attempt(model={"name": "resnet"})
    assert "Error: data set 'nope' is not prepared under" in attempt(dataset="nope")
    assert (
        "scaling: 8 workers with {CPU=1} each can never be placed: the cluster's nodes fit 3"
        in attempt(scaling={"num_workers": 8, "resources_per_worker": {"CPU": 1}})
    )


def test_job_records_outlive_the_cluster(digits: RunningCluster, tmp_path: Path) -> None:
    # Same storage root, but no cluster at the address: what `jobs list` shows after `down`.
    config = yaml.safe_load(digits.config_path.read_text())
    config["ports"]["dashboard"] = support.free_ports(1)[0]
    elsewhere = tmp_path / "down.yaml"
    elsewhere.write_text(yaml.safe_dump(config))
    result = support.run("aiaas", "jobs", "list", "--cluster", str(elsewhere))
    assert result.returncode == 0, result.stderr
    assert "aiaas-train-tiny-digits-mlp-" in result.stdout
    assert "SUCCEEDED" in result.stdout


@pytest.mark.slow
def test_losing_a_worker_node_resumes_from_the_checkpoint(
    digits: RunningCluster, tmp_path: Path
) -> None:
    scaling = yaml.safe_load((support.REPO / "configs/train/digits_mlp.yaml").read_text())[
        "scaling"
    ]
    # One worker per node, so losing a worker node always takes a training worker with it.
    scaling["placement_strategy"] = "STRICT_SPREAD"
    path = variant(
        tmp_path, "configs/train/digits_mlp.yaml", "node-loss", epochs=30, scaling=scaling
    )
    submission_id = _submit(digits, path)

    def log() -> str:
        return ray_job_logs(digits, submission_id)

    deadline = time.monotonic() + 300
    while '"epoch": 3,' not in log():
        assert time.monotonic() < deadline, "training never reached epoch 4"
        time.sleep(1)
    # STRICT_SPREAD puts the two workers on two nodes, so one is on a worker node.
    kill_a_train_worker_node(digits)

    status = aiaas_cli(digits, "jobs", "status", submission_id, "--json")
    deadline = time.monotonic() + 600
    while json.loads(status.stdout)["status"] not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, "the job did not finish after the node loss"
        time.sleep(3)
        status = aiaas_cli(digits, "jobs", "status", submission_id, "--json")
    record = json.loads(status.stdout)
    text = log()
    assert record["status"] == "SUCCEEDED", text[-3000:]
    resumed = [
        event for event in progress.events(text.splitlines()) if "resumed_from_epoch" in event
    ]
    assert resumed and resumed[0]["resumed_from_epoch"] >= 3, (
        "it must resume, not restart at epoch 0"
    )
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri(digits))
    assert len(client.search_model_versions("name='node-loss'")) == 1
    # Bring the lost node back for whatever runs next.
    assert _aiaas_plain("cluster", "up", str(digits.config_path)).returncode == 0


def _aiaas_plain(*args: str) -> support.subprocess.CompletedProcess[str]:
    return support.run("aiaas", *args)


@pytest.mark.slow
def test_a_damaged_data_set_fails_the_job_with_its_cause(
    digits: RunningCluster, tmp_path: Path
) -> None:
    dataset = tmp_path / "broken.yaml"
    dataset.write_text("kind: dataset\nname: broken\nsource: {type: sklearn_digits}\n")
    prepared = aiaas_cli(digits, "data", "prepare", str(dataset))
    assert prepared.returncode == 0, prepared.stderr
    for part in (storage_root(digits) / "datasets" / "broken" / "train").glob("*.parquet"):
        part.write_bytes(b"not parquet at all")
    path = variant(tmp_path, "configs/train/tiny/digits_mlp.yaml", "broken-run", dataset="broken")
    result = aiaas_cli(digits, "train", str(path), "--follow")
    assert result.returncode == 1
    assert ": FAILED" in result.stdout
    assert "the train split of data set 'broken' cannot be read:" in result.stderr
    assert "Prepare it again: aiaas data prepare configs/data/broken.yaml" in result.stderr
    assert "Traceback" not in result.stderr
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri(digits))
    assert client.search_model_versions("name='broken-run'") == []
