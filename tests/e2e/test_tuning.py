"""Hyperparameter search on the real cluster: early stopping, the results table, the best trial
registered, resume after a stop, and bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from tests import support
from tests.e2e.conftest import RunningCluster, aiaas_cli, mlflow_uri, storage_root

TINY = "configs/tune/tiny/digits_mlp.yaml"


def _tune_variant(tmp_path: Path, name: str, **changes: object) -> Path:
    config = yaml.safe_load((support.REPO / TINY).read_text())
    config.update(name=name, **changes)
    config["registration"] = {**config["registration"], "model_name": name}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_a_search_stops_weak_trials_early_and_registers_the_best(digits: RunningCluster) -> None:
    result = aiaas_cli(digits, "tune", TINY, "--follow", timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert ": SUCCEEDED" in result.stdout
    table = pd.read_parquet(
        storage_root(digits) / "tune" / "tune-tiny-digits-mlp" / "results.parquet"
    )
    print(table.to_string())
    assert len(table) == 8
    assert set(table["status"]) <= {"COMPLETED", "STOPPED EARLY"}
    assert (table["status"] == "STOPPED EARLY").any(), "ASHA stopped no trial early"
    assert (table["epochs_run"] < 4).any() and (table["epochs_run"] == 4).any()
    assert {"param.optimizer.lr", "param.model.hidden_sizes", "val_accuracy"} <= set(table)
    # The printed table is the same one, best first.
    assert "STOPPED EARLY" in result.stdout and "epochs_run" in result.stdout
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri(digits))
    [version] = client.search_model_versions("name='tune-tiny-digits-mlp'")
    tags = version.tags
    assert tags["aiaas.tune_run"] == "tune-tiny-digits-mlp"
    winning = json.loads(tags["aiaas.tune_params"])
    best = table.iloc[0]
    assert winning["optimizer.lr"] == pytest.approx(best["param.optimizer.lr"])
    assert tags["aiaas.ready"] == "true"


@pytest.mark.slow
def test_a_stopped_search_resumes_without_rerunning_finished_trials(
    digits: RunningCluster, tmp_path: Path
) -> None:
    space = yaml.safe_load((support.REPO / TINY).read_text())["search_space"]
    path = _tune_variant(
        tmp_path,
        "tune-resume",
        num_samples=3,
        max_concurrent_trials=1,
        scheduler={"name": "none"},
        search_space={**space, "epochs": {"grid": [2]}},  # short trials: the resume is tested
    )
    submitted = aiaas_cli(digits, "tune", str(path))
    assert submitted.returncode == 0, submitted.stderr
    submission_id = submitted.stdout.split("Submitted ", 1)[1].split()[0]
    experiment = storage_root(digits) / "tune" / "tune-resume"

    def finished() -> int:
        """Trials Tune's saved experiment state counts as finished."""
        texts = [p.read_text() for p in experiment.glob("experiment_state-*.json")]
        return max((text.count('\\"status\\": \\"TERMINATED\\"') for text in texts), default=0)

    deadline = time.monotonic() + 600
    while finished() < 1:
        assert time.monotonic() < deadline, "no trial finished"
        time.sleep(2)
    stopped = aiaas_cli(digits, "jobs", "stop", submission_id)
    assert stopped.returncode == 0, stopped.stderr
    done_before = finished()
    stopped_at = time.time()
    time.sleep(1)
    resumed = aiaas_cli(digits, "tune", str(path), "--resume", "--follow", timeout=1500)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    resumed_id = resumed.stdout.split("Submitted ", 1)[1].split()[0]
    record = json.loads(aiaas_cli(digits, "jobs", "status", resumed_id, "--json").stdout)
    assert record["result"]["resumed"] is True
    assert len(record["result"]["trials"]) == 3
    # Each trial trains under its own Train run; a finished trial's run is never written again.
    runs = sorted((storage_root(digits) / "runs").glob("tune-resume-*"))
    assert len(runs) == 3

    def last_write(run: Path) -> float:
        return max(p.stat().st_mtime for p in run.rglob("*"))

    written_after = [run.name for run in runs if last_write(run) > stopped_at]
    assert len(written_after) <= 3 - done_before, (written_after, done_before)
