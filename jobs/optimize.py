"""The optimize job: ``python -m jobs.optimize CONFIG`` (submitted by ``aiaas models optimize``).

Loads a registered version, converts it (dynamic int8, TorchScript or ONNX), measures both on the
test split and on the clock — alternating rounds in one process on one reserved CPU, so the
ratios compare like with like — and registers the result as a new version whose lineage names its
parent, only when the gate holds. The report is stored with the version (an artifact of its run)
and in the job record.
"""

from __future__ import annotations

import io
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from aiaas import artifacts, datasets, errors, progress, registration, registry
from aiaas.config import loader
from aiaas.config.optimize import OptimizeConfig
from aiaas.storage import Storage
from jobs import entrypoint, evaluation, gate, outcomes, records


def optimize(config: OptimizeConfig, job_id: str, storage_root: str) -> outcomes.OptimizeReport:
    """Convert, measure, gate and register; returns the report.

    Raises:
        ConfigError: Unknown parent, a method that does not apply, a data set that is gone.
        entrypoint.GateFailed: The optimized model misses the gate; nothing is registered.
    """
    storage = Storage(storage_root)
    parent = registry.resolve(config.parent, with_run=True)
    dataset = parent.lineage.get("dataset")
    if not dataset:
        raise errors.ConfigError(
            f"{parent.name}:{parent.version} has no data set in its lineage, so there is no "
            "test split to check the optimized model on",
            "Optimize a version trained by aiaas (aiaas models show shows its data set).",
        )
    schema = datasets.load_schema(storage, dataset)
    x, y = evaluation.test_split(storage, dataset, schema)
    source = artifacts.load(parent, threads=config.latency.threads)
    module: Any = getattr(source, "module", None)
    problem = artifacts.method_problem(config.method, module, parent.format)
    if problem:
        raise errors.ConfigError(
            f"cannot optimize {parent.name}:{parent.version} with {config.method}: {problem}"
        )
    converted = artifacts.convert(module, config.method, x[:8])
    child: artifacts.Predictor
    if config.method == "onnx":
        child = artifacts.OnnxPredictor(str(converted), config.latency.threads)
    else:
        child = artifacts.TorchPredictor(converted, config.method)
    report = _measure(config, source, child, x, y)
    report.parent.model, report.parent.version = parent.name, parent.version
    report.method = config.method
    report.size_bytes = outcomes.ModelSizes(parent=_size(module), optimized=_size(converted))
    progress.emit({"optimize": report.record()})
    broken = gate.optimize_failures(config.gate, report)
    report.gate = gate.verdict(broken)
    run_id = _log_run(config, parent, report, job_id)
    if broken:
        gate.refuse("optimize", broken, report)
    lineage = {
        **gate.job_lineage(config),
        # The id the driver passed: this runs in a task, whose own job id is the driver's.
        "job_id": job_id,
        "parent": f"{parent.name}:{parent.version}",
        "parent_run": parent.run_id,
        "method": config.method,
        "dataset": dataset,
        "dataset_fingerprint": parent.lineage.get("dataset_fingerprint", ""),
        "accuracy_delta_points": f"{report.accuracy_delta_points:+.3f}",
        "latency_ratio_single": f"{report.latency_ratio_single:.3f}",
    }
    name = config.register_as or parent.name
    if config.method == "onnx":
        registered = registration.register_onnx_model(
            run_id, name, str(converted), module, x[:8], lineage
        )
    else:
        registered = registration.register_torch_model(
            run_id, name, converted, x[:8], lineage, model_format=config.method
        )
    report.registered = outcomes.RegisteredVersion(
        model=registered.name, version=registered.version
    )
    return report


def _measure(
    config: OptimizeConfig,
    parent: artifacts.Predictor,
    child: artifacts.Predictor,
    x: np.ndarray,
    y: np.ndarray,
) -> outcomes.OptimizeReport:
    spec = config.latency
    accuracy = {
        "parent": float((parent.predict(x).argmax(1) == y).mean()),
        "optimized": float((child.predict(x).argmax(1) == y).mean()),
    }
    singles: dict[str, list[float]] = {"parent": [], "optimized": []}
    batched: dict[str, list[float]] = {"parent": [], "optimized": []}
    rows = [x[i : i + 1] for i in range(min(len(x), spec.single_requests))]
    batch = np.resize(x, (spec.batch_size, x.shape[1])).astype(np.float32)
    for round_number in range(spec.rounds):
        # Alternate who goes first so warm caches and CPU frequency favour neither.
        order = [("parent", parent), ("optimized", child)]
        for label, predictor in order if round_number % 2 == 0 else order[::-1]:
            predictor.predict(batch)  # warm-up
            for row in rows:
                started = time.perf_counter()
                predictor.predict(row)
                singles[label].append(time.perf_counter() - started)
            started = time.perf_counter()
            for _ in range(spec.batches):
                predictor.predict(batch)
            batched[label].append(spec.batches * spec.batch_size / (time.perf_counter() - started))

    def summary(label: str) -> outcomes.PredictorFigures:
        return outcomes.PredictorFigures(
            accuracy=round(accuracy[label], 6),
            p50_single_ms=round(float(np.percentile(singles[label], 50)) * 1000, 4),
            p99_single_ms=round(float(np.percentile(singles[label], 99)) * 1000, 4),
            batched_rows_per_s=round(float(np.median(batched[label])), 1),
        )

    parent_summary, child_summary = summary("parent"), summary("optimized")
    return outcomes.OptimizeReport(
        parent=parent_summary,
        optimized=child_summary,
        accuracy_delta_points=round((accuracy["optimized"] - accuracy["parent"]) * 100, 4),
        latency_ratio_single=round(child_summary.p50_single_ms / parent_summary.p50_single_ms, 4),
        throughput_ratio_batched=round(
            child_summary.batched_rows_per_s / parent_summary.batched_rows_per_s, 4
        ),
        test_rows=len(y),
        batch_size=spec.batch_size,
        rounds=spec.rounds,
        threads=spec.threads,
    )


def _log_run(
    config: OptimizeConfig, parent: registry.Version, report: outcomes.OptimizeReport, job_id: str
) -> str:
    import mlflow

    registry.client()
    experiment = parent.lineage.get("run") or parent.name
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=f"{config.name}-{job_id[-6:]}") as run:
        mlflow.log_params({"method": config.method, "parent": f"{parent.name}:{parent.version}"})
        mlflow.log_metrics(
            {
                "test_accuracy": report.optimized.accuracy,
                "accuracy_delta_points": report.accuracy_delta_points,
                "latency_ratio_single": report.latency_ratio_single,
                "throughput_ratio_batched": report.throughput_ratio_batched,
                "p50_single_ms": report.optimized.p50_single_ms,
            }
        )
        mlflow.log_dict(report.record(), "optimize_report.json")
        mlflow.set_tags({f"{registry.LINEAGE_PREFIX}job_id": job_id})
        return str(run.info.run_id)


def _size(model: Any) -> int:
    if isinstance(model, str):
        return Path(model).stat().st_size
    import torch

    buffer = io.BytesIO()
    if isinstance(model, torch.jit.ScriptModule):
        torch.jit.save(model, buffer)
    else:
        torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


class _TaskFailure(BaseModel):
    """One of our errors, sent back from the task as data: its hint and gate report survive
    the trip (a raised exception would reach the driver as Ray's wrapper)."""

    message: str
    hint: str | None = None
    report: outcomes.OptimizeReport | None = None


def run(config: OptimizeConfig) -> outcomes.OptimizeReport:
    """Run :func:`optimize` in a Ray task holding one CPU, so timings are not shared."""
    import ray

    storage = entrypoint.storage()
    ray.init(logging_level=logging.WARNING)
    task = ray.remote(num_cpus=1, max_retries=0)(_optimize_task)
    outcome: outcomes.OptimizeReport | _TaskFailure = ray.get(
        task.remote(config, records.current_job_id(), storage.root)
    )
    if isinstance(outcome, _TaskFailure):
        if outcome.report is not None:
            raise entrypoint.GateFailed(outcome.message, outcome.report)
        raise errors.JobError(outcome.message, outcome.hint)
    return outcome


def _optimize_task(
    config: OptimizeConfig, job_id: str, root: str
) -> outcomes.OptimizeReport | _TaskFailure:
    try:
        return optimize(config, job_id, root)
    except errors.AiaasError as exc:
        report = exc.outcome if isinstance(exc, entrypoint.GateFailed) else None
        return _TaskFailure(
            message=exc.message,
            hint=exc.hint,
            report=report if isinstance(report, outcomes.OptimizeReport) else None,
        )


def main(argv: list[str]) -> int:
    """Entry point of ``python -m jobs.optimize CONFIG``."""
    if len(argv) != 1:
        print("usage: python -m jobs.optimize CONFIG", file=sys.stderr)
        return 2
    config_path = Path(argv[0])
    config: OptimizeConfig | None = None

    def work() -> outcomes.OptimizeReport:
        nonlocal config
        config = loader.load(config_path, OptimizeConfig)
        return run(config)

    code, report = entrypoint.run_job("optimize", config_path, work)
    registered = report.registered if report else None
    if report and registered and config is not None:
        print(
            f"Registered {registered.model} version {registered.version} "
            f"({config.method} of {config.model}: accuracy "
            f"{report.accuracy_delta_points:+.2f} points, single-request latency "
            f"{report.latency_ratio_single:.2f}x, batched throughput "
            f"{report.throughput_ratio_batched:.2f}x)"
        )
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
