"""The registration gate and the registration step, shared by every job that makes a model.

Train and tune evaluate their best checkpoint here and register it when the config's gate holds
(:func:`evaluate_and_register`); finetune judges its adapter in :mod:`jobs.finetune_gate`;
optimize judges its measurements with :func:`optimize_failures`. Every job states the verdict,
refuses a failed gate and writes the lineage it shares (job, config, commit) the same way. Runs
on the job's driver.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

from aiaas import datasets, progress, registration, registry
from aiaas.config.optimize import OptimizeGate
from aiaas.config.train import RegisterSpec, TrainConfig
from aiaas.storage import Storage
from jobs import entrypoint, evaluation, outcomes, records

PASSED = "passed"


def training_failures(spec: RegisterSpec, test: outcomes.TestMetrics) -> list[str]:
    """The conditions of a train config's gate that the test metrics break, as sentences."""
    return spec.failures(test.by_name())


def optimize_failures(gate: OptimizeGate, report: outcomes.OptimizeReport) -> list[str]:
    """The limits of an optimize gate that the optimized model breaks, as sentences."""
    broken = []
    drop = -report.accuracy_delta_points
    if drop > gate.max_accuracy_drop:
        broken.append(
            f"test accuracy dropped {drop:.2f} points (allowed: {gate.max_accuracy_drop:g})"
        )
    ratio = report.latency_ratio_single
    if gate.max_latency_ratio is not None and ratio > gate.max_latency_ratio:
        broken.append(
            f"p50 single-request latency is {ratio:.2f}x the parent's "
            f"(allowed: {gate.max_latency_ratio:g}x)"
        )
    return broken


def verdict(broken: list[str]) -> str:
    """The gate as the outcome states it: ``passed`` or ``failed: <reasons>``."""
    return "failed: " + "; ".join(broken) if broken else PASSED


def refuse(job: str, broken: list[str], outcome: entrypoint.Judged) -> NoReturn:
    """End a job whose gate failed; its outcome (with the verdict) goes to the job record.

    Raises:
        entrypoint.GateFailed: Always.
    """
    raise entrypoint.GateFailed(
        f"{job} gate failed: {'; '.join(broken)}; nothing was registered", outcome
    )


def job_lineage(config: Any) -> dict[str, str]:
    """The lineage every registered version carries: the job, its config's hash, the commit.

    Args:
        config: The job's validated config (a pydantic model).
    """
    return {
        "job_id": records.current_job_id(),
        "config_hash": records.config_hash(config.model_dump(mode="json")),
        "git_commit": records.git_commit(),
    }


def evaluate_and_register(
    config: TrainConfig,
    config_path: Path,
    schema: datasets.DatasetSchema,
    storage: Storage,
    best: Any,
    history: list[outcomes.EpochMetrics],
    summary: outcomes.RunSummary,
    lineage_extra: dict[str, str] | None = None,
) -> outcomes.TrainingOutcome:
    """Evaluate a checkpoint on the test split; log the run and register it if the gate holds.

    Raises:
        entrypoint.GateFailed: The gate does not hold; nothing is registered.
    """
    model = evaluation.load_model(config, schema, best)
    test = evaluation.evaluate(model, storage, config, schema)
    outcome = outcomes.TrainingOutcome.model_validate(
        {
            **dict(summary),
            "test": test,
            "epochs_run": len(history),
            "history": history,
            "checkpoint": best.path,
        }
    )
    progress.emit({"test": test.record()})
    if config.registration is None:
        return outcome
    lineage = {**training_lineage(config, config_path, schema), **(lineage_extra or {})}
    run_id = registration.log_run(
        experiment=config.name,
        run_name=lineage["job_id"],
        params=flatten(config.model_dump(mode="json")),
        history=[epoch.record() for epoch in history],
        metrics=test.record(),
        tags=lineage,
    )
    broken = training_failures(config.registration, test)
    outcome.gate = verdict(broken)
    if broken:
        refuse("registration", broken, outcome)
    outcome.registered = already_registered(config.registration.model_name, best.path)
    if outcome.registered is None:
        lineage["checkpoint"] = best.path
        example = evaluation.test_head(storage, config.dataset, schema)
        registered = registration.register_torch_model(
            run_id, config.registration.model_name, model, example, lineage
        )
        outcome.registered = outcomes.RegisteredVersion(
            model=registered.name, version=registered.version
        )
    return outcome


def already_registered(model_name: str, checkpoint: str) -> outcomes.RegisteredVersion | None:
    """The version already registered from this checkpoint: a finished run started again
    resumes at its end, same weights, and makes no second version."""
    for version in registry.versions(model_name):
        # One registered before artifacts carried digests cannot be served: register anew.
        if (
            version.ready
            and version.artifact_sha256
            and version.lineage.get("checkpoint") == checkpoint
        ):
            return outcomes.RegisteredVersion(
                model=model_name, version=version.version, already=True
            )
    return None


def training_lineage(
    config: TrainConfig, config_path: Path, schema: datasets.DatasetSchema
) -> dict[str, str]:
    """The lineage of a version trained from a config: where its data and config came from."""
    return {
        **job_lineage(config),
        "ray_job_id": ray_job_id(),
        "dataset": schema.name,
        "dataset_fingerprint": schema.fingerprint,
        "config_path": str(config_path),
        "run": config.name,
    }


def ray_job_id() -> str:
    """Ray's id of the running job (the driver has joined the cluster)."""
    import ray

    return str(ray.get_runtime_context().get_job_id())


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
