"""The model lifecycle on the real cluster: list/show, aliases and their history, optimize jobs
with their gates, concurrent and crashed registrations, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import numpy as np
import pytest

from tests import support
from tests.e2e.conftest import TrainedModel, aiaas_cli, mlflow_uri, storage_root


def _versions(trained: TrainedModel, name: str | None = None) -> list[str]:
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri(trained.cluster))
    found = client.search_model_versions(f"name='{name or trained.name}'")
    return sorted((v.version for v in found), key=int)


def _show(trained: TrainedModel, reference: str) -> dict:
    result = aiaas_cli(trained.cluster, "models", "show", reference, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dynamic-int8", "torchscript", "onnx"])
def test_optimize_registers_a_measured_child_version(trained: TrainedModel, method: str) -> None:
    before = _versions(trained)
    result = aiaas_cli(
        trained.cluster,
        "models",
        "optimize",
        f"{trained.name}:{trained.version}",
        "--method",
        method,
        "--follow",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    after = _versions(trained)
    assert len(after) == len(before) + 1
    child = after[-1]
    assert f"registered {trained.name}:{child}" in result.stdout
    details = _show(trained, f"{trained.name}:{child}")
    assert details["format"] == method
    lineage = details["lineage"]
    assert lineage[0]["tags"]["parent"] == f"{trained.name}:{trained.version}"
    assert lineage[0]["tags"]["method"] == method
    # The chain reaches the trained original, down to its data set and Ray job.
    assert lineage[1]["version"] == trained.version
    assert len(lineage[1]["tags"]["dataset_fingerprint"]) == 32
    assert lineage[1]["tags"]["ray_job_id"]
    delta = float(lineage[0]["tags"]["accuracy_delta_points"])
    ratio = float(lineage[0]["tags"]["latency_ratio_single"])
    assert delta >= -0.5 and ratio > 0
    print(f"{method}: accuracy {delta:+.3f} points, single-request latency {ratio:.2f}x")
    # The report is kept with the version's run too.
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri(trained.cluster))
    run_id = client.get_model_version(trained.name, child).run_id
    with open(client.download_artifacts(run_id, "optimize_report.json")) as stored:
        report = json.load(stored)
    assert report["method"] == method and report["gate"] == "passed"
    assert report["parent"]["p50_single_ms"] > 0 and report["optimized"]["p50_single_ms"] > 0
    _same_predictions(trained, child)


def _same_predictions(trained: TrainedModel, child: str) -> None:
    """The child, loaded the way serving loads it, agrees with its parent on the test split."""
    probe = (
        "import json, os, sys\n"
        "import numpy as np\n"
        "from aiaas import artifacts, datasets, registry\n"
        "from aiaas.storage import Storage\n"
        "from jobs import evaluation\n"
        "storage = Storage(sys.argv[1])\n"
        "schema = datasets.load_schema(storage, 'digits')\n"
        "x, y = evaluation.test_split(storage, 'digits', schema)\n"
        "out = {}\n"
        "for v in sys.argv[3:]:\n"
        "    version = registry.resolve(registry.ModelRef(sys.argv[2], version=v))\n"
        "    out[v] = artifacts.load(version).predict(x).argmax(1).tolist()\n"
        "print(json.dumps(out))\n"
    )
    env = {**support.env(), "MLFLOW_TRACKING_URI": mlflow_uri(trained.cluster)}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            probe,
            str(storage_root(trained.cluster)),
            trained.name,
            trained.version,
            child,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=support.REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    predictions = json.loads(result.stdout.strip().splitlines()[-1])
    agreement = np.mean(np.array(predictions[trained.version]) == np.array(predictions[child]))
    assert agreement >= 0.98, agreement


@pytest.mark.slow
def test_a_failing_optimize_gate_leaves_the_registry_unchanged(trained: TrainedModel) -> None:
    before = _versions(trained)
    result = aiaas_cli(
        trained.cluster,
        "models",
        "optimize",
        f"{trained.name}:{trained.version}",
        "--method",
        "dynamic-int8",
        "--max-latency-ratio",
        "0.001",
        "--follow",
    )
    assert result.returncode == 1
    assert "optimize gate failed: p50 single-request latency is" in result.stderr
    assert "(allowed: 0.001x); nothing was registered" in result.stderr
    assert "Traceback" not in result.stderr
    assert _versions(trained) == before


def test_promote_and_rollback_move_the_alias_and_keep_its_history(trained: TrainedModel) -> None:
    name, first = trained.name, trained.version
    promoted = aiaas_cli(trained.cluster, "models", "promote", name, first, "--alias", "staging")
    assert promoted.returncode == 0, promoted.stderr
    assert f"{name}@staging: (unset) → {first}" in promoted.stdout
    # A second version to move to: the same weights registered again by a concurrent-safe path.
    second = _register_copies(trained, name, 1)[0]
    moved = aiaas_cli(trained.cluster, "models", "promote", name, second, "--alias", "staging")
    assert moved.returncode == 0, moved.stderr
    details = _show(trained, f"{name}@staging")
    assert details["version"] == second and "staging" in details["aliases"]
    rolled = aiaas_cli(trained.cluster, "models", "rollback", name, "--alias", "staging")
    assert rolled.returncode == 0, rolled.stderr
    assert f"{name}@staging: {second} → {first} (rolled back)" in rolled.stdout
    history = [
        move
        for move in _show(trained, f"{name}:{first}")["alias_history"]
        if move["alias"] == "staging"
    ]
    assert [(m["action"], m["from"], m["to"]) for m in history] == [
        ("promote", None, first),
        ("promote", first, second),
        ("rollback", second, first),
    ]
    assert all(m["who"] and m["at"] for m in history)
    # Nothing earlier to go back to now.
    again = aiaas_cli(trained.cluster, "models", "rollback", name, "--alias", "staging")
    assert again.returncode == 1
    assert "has no earlier version to roll back to" in again.stderr
    listed = aiaas_cli(trained.cluster, "models", "list", name)
    row = next(line for line in listed.stdout.splitlines() if line.split()[1] == first)
    assert "staging" in row and "ready" in row


def _register_copies(
    trained: TrainedModel, model_name: str, count: int, crash: bool = False
) -> list[str]:
    """Register ``count`` versions of ``model_name`` from a separate process (as a job would)."""
    script = (
        "import os, sys, numpy as np, torch\n"
        "from aiaas import registration, registry\n"
        "from aiaas.config.train import ModelSpec\n"
        "from aiaas import models\n"
        "import mlflow\n"
        "if os.environ.get('CRASH_BEFORE_READY'):\n"
        "    original = registry.client\n"
        "    class Dying:\n"
        "        def __init__(self, inner): self.inner = inner\n"
        "        def __getattr__(self, name): return getattr(self.inner, name)\n"
        "        def set_model_version_tag(self, name, version, key, value):\n"
        "            if key == registry.READY_TAG: os._exit(3)\n"
        "            return self.inner.set_model_version_tag(name, version, key, value)\n"
        "    registry.client = lambda uri=None: Dying(original(uri))\n"
        "model = models.build(ModelSpec(name='mlp', hidden_sizes=[16]), 64, 10, None)\n"
        "example = np.zeros((4, 64), dtype=np.float32)\n"
        "mlflow.set_tracking_uri(os.environ['MLFLOW_TRACKING_URI'])\n"
        "mlflow.set_experiment('registrations')\n"
        "for _ in range(int(sys.argv[2])):\n"
        "    with mlflow.start_run() as run: pass\n"
        "    done = registration.register_torch_model(run.info.run_id, sys.argv[1], model,\n"
        "        example, {'job_id': 'test'})\n"
        "    print('VERSION', done.version, flush=True)\n"
    )
    env = {**support.env(), "MLFLOW_TRACKING_URI": mlflow_uri(trained.cluster)}
    if crash:
        env["CRASH_BEFORE_READY"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", script, model_name, str(count)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=support.REPO,
    )
    if crash:
        assert result.returncode == 3, result.stderr[-2000:]
        return []
    assert result.returncode == 0, result.stderr[-2000:]
    return [line.split()[1] for line in result.stdout.splitlines() if line.startswith("VERSION")]


@pytest.mark.slow
def test_concurrent_registrations_get_distinct_versions(trained: TrainedModel) -> None:
    from concurrent.futures import ThreadPoolExecutor

    # Two registering processes at once, on a model neither has created yet.
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: _register_copies(trained, "racing", 3), range(2)))
    numbers = [number for found in results for number in found]
    assert len(numbers) == 6 and len(set(numbers)) == 6, results
    assert _versions(trained, "racing") == [str(n) for n in range(1, 7)]


def test_a_crashed_registration_is_never_servable(trained: TrainedModel, tmp_path) -> None:
    _register_copies(trained, "crashing", 1, crash=True)
    assert _versions(trained, "crashing") == ["1"]  # MLflow has it, half-done
    listed = aiaas_cli(trained.cluster, "models", "list", "crashing")
    assert "incomplete" in listed.stdout
    promoted = aiaas_cli(trained.cluster, "models", "promote", "crashing", "1")
    assert promoted.returncode == 1
    assert "crashing:1 never finished registering" in promoted.stderr
    serve_file = tmp_path / "serve.yaml"
    serve_file.write_text(
        "applications:\n"
        "  - name: crashing\n"
        "    route_prefix: /crashing\n"
        "    import_path: serve_apps.model_server:build_app\n"
        "    args: {models: [{name: crashing, model: 'crashing:1'}]}\n"
    )
    deployed = aiaas_cli(trained.cluster, "serve", "deploy", str(serve_file))
    assert deployed.returncode == 1
    assert "app 'crashing', model 'crashing': crashing:1 never finished registering" in (
        deployed.stderr
    )


def test_bad_references_get_clear_errors(trained: TrainedModel) -> None:
    def error(*args: str) -> str:
        result = aiaas_cli(trained.cluster, "models", *args)
        assert result.returncode == 1, result.stdout
        assert "Traceback" not in result.stderr
        return result.stderr

    assert "no registered model 'lifecycle-mpl'" in error("show", "lifecycle-mpl")
    assert "did you mean 'lifecycle-mlp'?" in error("show", "lifecycle-mpl")
    assert f"model '{trained.name}' has no version 999 (versions: 1" in error(
        "show", f"{trained.name}:999"
    )
    assert f"model '{trained.name}' has no alias 'canary'" in error(
        "show", f"{trained.name}@canary"
    )
    assert "'lifecycle mlp' is not a model reference" in error(
        "optimize", "lifecycle mlp", "--method", "onnx"
    )
    assert "is not a model reference" in error("optimize", trained.name, "--method", "onnx")
    assert "Invalid value for '--method'" in error(
        "optimize", f"{trained.name}:1", "--method", "fp4"
    )


@pytest.mark.slow
def test_an_optimized_version_is_not_optimized_again(trained: TrainedModel) -> None:
    made = aiaas_cli(
        trained.cluster,
        "models",
        "optimize",
        f"{trained.name}:{trained.version}",
        "--method",
        "onnx",
        "--follow",
    )
    assert made.returncode == 0, made.stderr
    onnx = _versions(trained)[-1]
    result = aiaas_cli(
        trained.cluster, "models", "optimize", f"{trained.name}:{onnx}", "--method", "dynamic-int8"
    )
    assert result.returncode == 1
    assert f"dynamic-int8 converts an eager PyTorch model, but {trained.name}:{onnx} is 'onnx'" in (
        result.stderr
    )
    assert f"Optimize the version it was made from: {trained.name}:{trained.version}" in (
        result.stderr
    )


@pytest.mark.slow
def test_ray_job_submit_runs_the_optimize_entrypoint(trained: TrainedModel, tmp_path) -> None:
    import yaml

    config = yaml.safe_load((support.REPO / "configs/optimize/digits_mlp_int8.yaml").read_text())
    config["model"] = f"{trained.name}:{trained.version}"
    path = tmp_path / "optimize.yaml"  # the local cluster shares this file system
    path.write_text(yaml.safe_dump(config))
    before = _versions(trained)
    result = support.ray_job_submit(
        trained.cluster.dashboard_url,
        "python",
        "-m",
        "jobs.optimize",
        str(path),
        ray_env=trained.cluster.ray_env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Registered {trained.name} version" in result.stdout
    assert "(dynamic-int8 of" in result.stdout
    assert len(_versions(trained)) == len(before) + 1
