"""A search over a finetune config: what its config accepts and refuses, and the config each
trial runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aiaas import errors
from aiaas.config import loader
from aiaas.config.finetune import FinetuneConfig
from aiaas.config.tune import TuneConfig
from jobs import tune_finetune

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "configs/tune/smollm2_iso_dates_lora.yaml"
QUICK = REPO / "configs/finetune/smollm2_iso_dates_lora_quick.yaml"


def _problems(tmp_path: Path, **changes: object) -> str:
    data = {**yaml.safe_load(SHIPPED.read_text()), **changes}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(errors.ConfigError) as refused:
        loader.load(path, TuneConfig)
    return str(refused.value)


def test_a_finetune_search_compares_validation_loss_unless_told_otherwise(tmp_path: Path) -> None:
    data = yaml.safe_load(SHIPPED.read_text())
    del data["metric"], data["mode"]
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(data))
    config = loader.load(path, TuneConfig)
    assert (config.metric, config.mode, config.searched) == ("eval_loss", "min", data["finetune"])


def test_bad_finetune_searches_name_the_field_and_the_fix(tmp_path: Path) -> None:
    text = _problems(tmp_path, search_space={"lora.rnk": {"choice": [4]}})
    assert (
        "search_space" in text
        and "'lora.rnk': lora has no field 'rnk'; did you mean 'rank'?" in text
    )
    text = _problems(tmp_path, search_space={"base_model": {"choice": ["smollm2@staging"]}})
    assert "'base_model' is not a hyperparameter" in text
    text = _problems(tmp_path, metric="val_accuracy")
    assert "the fine-tuning job never reports 'val_accuracy'; use one of eval_loss" in text
    text = _problems(tmp_path, scaling={"num_workers": 2})
    assert "a finetune search takes scaling from its finetune config" in text
    text = _problems(tmp_path, train="configs/train/digits_mlp.yaml")
    assert "exactly one of train or finetune" in text


def test_a_trial_checkpoints_at_each_eval_step_with_its_values() -> None:
    config = loader.load(SHIPPED, TuneConfig)
    base = loader.load(QUICK, FinetuneConfig)
    trial = tune_finetune.trial_config(config, base, {"lora.rank": 4, "optimizer.lr": 0.001})
    assert trial.adapter.rank == 4 and trial.optimizer.lr == 0.001
    assert trial.checkpoint.every_steps == trial.eval_every_steps == base.eval_every_steps
    no_evals = base.model_copy(update={"eval_every_steps": None})
    assert tune_finetune.trial_config(config, no_evals, {}).eval_every_steps == (
        base.checkpoint.every_steps
    )
