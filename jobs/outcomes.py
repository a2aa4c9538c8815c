"""What a job produces, typed: the one owner of ``jobs/<id>/result.json``.

Jobs build these models and write them (:meth:`OutcomeModel.record`); ``jobs.records`` reads
them back (:func:`parse`). Fields a job did not produce are None and left out of the file, and
fields are declared in the order the file has always listed them, so ``result.json`` and
``aiaas jobs status --json`` read as before the models existed.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, TypeAdapter, ValidationError


class OutcomeModel(BaseModel):
    """The shared wire form: JSON, without the fields that were not produced."""

    def record(self) -> dict[str, Any]:
        """The JSON form written to ``result.json`` and printed in progress events (values JSON
        cannot encode, e.g. a numpy scalar in a trial row, are written as ``str``)."""
        return self.model_dump(mode="json", exclude_none=True, fallback=str)


class TestMetrics(OutcomeModel):
    """A model's figures on the test split (what a registration gate judges)."""

    # Not a test class, whatever pytest's name pattern thinks.
    __test__ = False

    accuracy: float = Field(description="share of test rows predicted right")
    loss: float = Field(description="mean cross-entropy loss")
    rows: int = Field(description="test rows evaluated")

    def by_name(self) -> dict[str, float]:
        """The metrics by the names a gate's conditions use (``accuracy: ">= 0.9"``)."""
        return {"accuracy": self.accuracy, "loss": self.loss, "rows": float(self.rows)}


class EpochMetrics(OutcomeModel):
    """One epoch of a run's history (job record, MLflow); None where a run did not report it."""

    epoch: float | None = None
    train_loss: float | None = None
    train_accuracy: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    samples_per_s: float | None = None


#: The per-epoch metrics kept in a run's history.
HISTORY_KEYS = tuple(EpochMetrics.model_fields)


class RegisteredVersion(OutcomeModel):
    """The registry version a job registered (or found already registered)."""

    model: str
    version: str
    already: bool | None = Field(
        None, description="True when a restarted run found its checkpoint already registered"
    )


class RunSummary(OutcomeModel):
    """What a training run reports before its best checkpoint is evaluated; a tune run adds
    its search."""

    run: str = Field(description="the run's name")
    train_seconds: float | None = Field(None, description="wall-clock time of the fit (train)")
    resumed: bool | None = Field(None, description="a restored search (tune --resume)")
    # Rows keep their dynamic columns (``param.<path>``, the searched metric) as the table has.
    trials: list[dict[str, Any]] | None = Field(None, description="the tune results table")
    best_trial: str | None = None
    best_params: dict[str, Any] | None = None
    results: str | None = Field(None, description="where the results table is stored")


class TrainingOutcome(RunSummary):
    """The outcome of a train or tune job (and any job that registers a trained checkpoint)."""

    test: TestMetrics
    epochs_run: int
    history: list[EpochMetrics]
    checkpoint: str = Field(description="path of the evaluated checkpoint")
    registered: RegisteredVersion | None = None
    gate: str | None = Field(None, description="'passed' or 'failed: <reasons>'")
    error: str | None = None


class GateFigures(OutcomeModel):
    """What a fine-tuning gate judges: validation losses, and exact answers on test prompts."""

    eval_loss: float = Field(description="validation loss per target token, fine-tuned")
    base_eval_loss: float = Field(description="the same for the base model, before training")
    exact_match: float = Field(description="share of test prompts answered exactly")
    matched: int = Field(description="test prompts answered exactly")
    test_rows: int = Field(description="test prompts answered")
    base_exact_match: float | None = Field(
        None, description="the same share for the base model (before aiaas measured it: None)"
    )
    base_matched: int | None = Field(None, description="test prompts the base answered exactly")


class StepMetrics(OutcomeModel):
    """One report of a fine-tuning run (every eval or checkpoint step); None where a report
    did not carry the figure."""

    step: float | None = None
    epoch: float | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    base_eval_loss: float | None = None
    tokens_per_s: float | None = None
    samples_per_s: float | None = None
    lr: float | None = None


#: The per-report metrics kept in a fine-tuning run's history.
STEP_KEYS = tuple(StepMetrics.model_fields)


class FinetuneOutcome(RunSummary):
    """The outcome of a fine-tuning job."""

    base: str = Field(description="the base version, NAME:VERSION")
    method: str = Field(description="lora or full")
    figures: GateFigures
    steps_run: int
    history: list[StepMetrics]
    checkpoint: str = Field(description="path of the evaluated (latest) checkpoint")
    registered: RegisteredVersion | None = None
    gate: str | None = Field(None, description="'passed' or 'failed: <reasons>'")
    error: str | None = None


class PredictorFigures(OutcomeModel):
    """One side of an optimize comparison, measured in the same rounds as the other."""

    accuracy: float
    p50_single_ms: float
    p99_single_ms: float
    batched_rows_per_s: float
    model: str | None = None
    version: str | None = None


class ModelSizes(OutcomeModel):
    """Serialized sizes in bytes."""

    parent: int
    optimized: int


class OptimizeReport(OutcomeModel):
    """The outcome of an optimize job: both models measured, the gate, the new version."""

    parent: PredictorFigures
    optimized: PredictorFigures
    accuracy_delta_points: float
    latency_ratio_single: float
    throughput_ratio_batched: float
    test_rows: int
    batch_size: int
    rounds: int
    threads: int
    method: str | None = None
    size_bytes: ModelSizes | None = None
    gate: str | None = None
    registered: RegisteredVersion | None = None
    error: str | None = None


class JobFailure(OutcomeModel):
    """A job that failed before it produced anything else."""

    error: str


#: Any job's outcome. Tried in this order: the first model whose required fields are all there.
JobOutcome = TrainingOutcome | FinetuneOutcome | OptimizeReport | JobFailure
_OUTCOME: TypeAdapter[JobOutcome] = TypeAdapter(
    Annotated[JobOutcome, Field(union_mode="left_to_right")]
)


def parse(data: dict[str, Any]) -> JobOutcome | None:
    """The typed outcome of a ``result.json``, or None when it matches no outcome model."""
    try:
        return _OUTCOME.validate_python(data)
    except ValidationError:
        return None
