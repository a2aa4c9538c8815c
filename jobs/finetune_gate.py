"""The fine-tuning gate and registration, on the job's driver after the fit.

The gate judges the run's latest checkpoint: its validation loss (target tokens only) against
the base model's, both measured by the workers on the same split, and the share of test
prompts whose greedy answer the skill's ``exact_match`` accepts. When it holds, the adapter is
registered as a new version of ``registration.model`` (the adapter files only, format
``hf-lora-adapter``; a full fine-tune registers a whole ``hf-causal-lm`` model) with lineage to
the base version, the data set, the job and its config. A failed gate registers nothing and the
job fails with the figures.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiaas import adapters, causal_lm, errors, progress, registration
from aiaas.config.finetune import FinetuneConfig, FinetuneGate
from jobs import finetune_data, finetune_trainer, finetune_weights, gate, outcomes

Messages = list[dict[str, Any]]


def failures(spec: FinetuneGate, figures: outcomes.GateFigures) -> list[str]:
    """The conditions of a fine-tuning gate that the figures break, as sentences."""
    broken = []
    if spec.eval_loss_below_base and not figures.eval_loss < figures.base_eval_loss:
        broken.append(
            f"validation loss {figures.eval_loss:.4f} is not below the base model's "
            f"{figures.base_eval_loss:.4f}"
        )
    if figures.exact_match < spec.min_exact_match:
        broken.append(
            f"test exact match {figures.exact_match:.4f} ({figures.matched} of "
            f"{figures.test_rows}) is not >= {spec.min_exact_match:g}"
        )
    return broken


def skill_score() -> Callable[[str, str], bool]:
    """The chat skill's scorer, ``aiaas.skills.exact_match(prediction, target)``.

    Raises:
        ConfigError: This aiaas has no skills module.
    """
    try:
        skills = importlib.import_module("aiaas.skills")
    except ImportError:
        raise errors.ConfigError(
            "aiaas.skills is missing, so answers cannot be scored",
            "Install an aiaas that ships chat data sets (aiaas.skills).",
        ) from None
    score: Callable[[str, str], bool] = skills.exact_match
    return score


def answers(
    model: Any, tokenizer: Any, conversations: list[Messages], max_new_tokens: int, batch: int
) -> list[str]:
    """Greedy answers to each conversation, rendered with the chat template's generation
    prompt, in left-padded batches."""
    import torch

    tokenizer.padding_side = "left"
    found: list[str] = []
    for start in range(0, len(conversations), batch):
        texts = [
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            for messages in conversations[start : start + batch]
        ]
        # As the data set tokenized them: the template already holds the special tokens.
        encoded = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new = output[:, encoded["input_ids"].shape[1] :]
        found += tokenizer.batch_decode(new, skip_special_tokens=True)
    return found


def judge(
    reported: dict[str, Any],
    model: Any,
    tokenizer: Any,
    prompts: list[tuple[Messages, str]],
    score: Callable[[str, str], bool],
    *,
    max_new_tokens: int,
    batch: int,
    base: Any = None,
) -> outcomes.GateFigures:
    """The gate's figures: the losses the checkpoint's step reported, and exact match of the
    model's greedy answers to ``prompts`` (and of the ``base`` model's, when given)."""
    conversations = [messages for messages, _ in prompts]

    def matched_by(chosen: Any) -> int:
        said = answers(chosen, tokenizer, conversations, max_new_tokens, batch)
        return sum(score(answer, target) for answer, (_, target) in zip(said, prompts, strict=True))

    def share(count: int) -> float:
        return round(count / len(prompts), 6) if prompts else 0.0

    matched = matched_by(model)
    base_matched = matched_by(base) if base is not None else None
    return outcomes.GateFigures(
        eval_loss=round(float(reported["eval_loss"]), 6),
        base_eval_loss=round(float(reported["base_eval_loss"]), 6),
        exact_match=share(matched),
        matched=matched,
        test_rows=len(prompts),
        base_exact_match=None if base_matched is None else share(base_matched),
        base_matched=base_matched,
    )


def evaluate_and_register(
    config: FinetuneConfig,
    config_path: Path,
    prepared: finetune_trainer.Prepared,
    result: Any,
    summary: outcomes.RunSummary,
    lineage_extra: dict[str, str] | None = None,
) -> outcomes.FinetuneOutcome:
    """Judge the run's latest checkpoint; log the run and register it if the gate holds
    (``lineage_extra``: what a tune run adds to the version's lineage).

    Raises:
        entrypoint.GateFailed: The gate does not hold; nothing is registered.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = finetune_trainer.latest_checkpoint(config, result)
    history = finetune_trainer.history(result)
    base = prepared.base
    spec = config.registration.gate if config.registration else None
    # Without a registration the figures are still measured, on a few prompts.
    rows, new_tokens = (spec.test_rows, spec.max_new_tokens) if spec else (8, 64)
    prompts = finetune_data.test_prompts(prepared.storage, config.dataset, rows)
    torch.set_num_threads(config.scaling.threads())
    with checkpoint.as_directory() as directory:
        reported = finetune_weights.read_figures(Path(directory))
        model = finetune_weights.load_trained(config, prepared.base_directory, Path(directory))
        tokenizer = AutoTokenizer.from_pretrained(prepared.base_directory)
        # The base model answers the same prompts: the figure the fine-tune is measured from.
        untrained = AutoModelForCausalLM.from_pretrained(
            prepared.base_directory, dtype=torch.float32
        ).eval()
        figures = judge(
            reported,
            model,
            tokenizer,
            prompts,
            skill_score(),
            max_new_tokens=new_tokens,
            batch=config.batch_size,
            base=untrained,
        )
        del model, untrained
        progress.emit({"gate": figures.record()})
        outcome = outcomes.FinetuneOutcome.model_validate(
            {
                **dict(summary),
                "base": f"{base.name}:{base.version}",
                "method": config.method,
                "figures": figures,
                "steps_run": int(reported.get("step", prepared.steps.total_steps)),
                "history": history,
                "checkpoint": checkpoint.path,
            }
        )
        if config.registration is None or spec is None:
            return outcome
        lineage = {
            **finetune_lineage(config, config_path, prepared, figures),
            **(lineage_extra or {}),
        }
        run_id = registration.log_run(
            experiment=config.name,
            run_name=lineage["job_id"],
            params=gate.flatten(config.model_dump(mode="json")),
            history=[step.record() for step in history],
            metrics={
                "exact_match": figures.exact_match,
                **(
                    {"base_exact_match": figures.base_exact_match}
                    if figures.base_exact_match is not None
                    else {}
                ),
            },
            tags=lineage,
            step_key="step",
        )
        broken = failures(spec, figures)
        outcome.gate = gate.verdict(broken)
        if broken:
            gate.refuse("registration", broken, outcome)
        name = config.registration.model
        outcome.registered = gate.already_registered(name, checkpoint.path)
        if outcome.registered is None:
            lineage["checkpoint"] = checkpoint.path
            if config.method == "lora":
                registered = adapters.register(
                    run_id, name, Path(directory) / finetune_weights.ADAPTER, base, lineage
                )
            else:
                registered = causal_lm.register_trained(
                    run_id,
                    name,
                    Path(directory) / finetune_weights.MODEL,
                    prepared.base_directory,
                    {**lineage, "parent": f"{base.name}:{base.version}"},
                )
            outcome.registered = outcomes.RegisteredVersion(
                model=registered.name, version=registered.version
            )
    return outcome


def finetune_lineage(
    config: FinetuneConfig,
    config_path: Path,
    prepared: finetune_trainer.Prepared,
    figures: outcomes.GateFigures,
) -> dict[str, str]:
    """What a fine-tuned version records: its base, data, job, config, and the gate's figures."""
    base = prepared.base
    lineage = {
        **gate.job_lineage(config),
        "ray_job_id": gate.ray_job_id(),
        "base_model": base.name,
        "base_version": base.version,
        "base_reference": config.base_model,
        "method": config.method,
        "dataset": prepared.data.name,
        "dataset_fingerprint": prepared.data.fingerprint,
        "config_path": str(config_path),
        "run": config.name,
        "eval_loss": f"{figures.eval_loss:.6f}",
        "base_eval_loss": f"{figures.base_eval_loss:.6f}",
        "exact_match": f"{figures.exact_match:.4f} ({figures.matched}/{figures.test_rows})",
    }
    if figures.base_exact_match is not None:
        lineage["base_exact_match"] = (
            f"{figures.base_exact_match:.4f} ({figures.base_matched}/{figures.test_rows})"
        )
    if config.method == "lora":
        lora = config.adapter
        lineage["lora"] = (
            f"rank {lora.rank}, alpha {lora.alpha:g}, dropout {lora.dropout:g}, "
            f"targets {','.join(lora.target_modules)}"
        )
    return lineage
