"""Train and dataset configs: messages users see, and what converts to Ray Train objects."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiaas import errors, placement
from aiaas.config import loader
from aiaas.config.train import TrainConfig

REPO = Path(__file__).resolve().parents[2]


def _error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(errors.ConfigError) as caught:
        loader.load(path)
    return str(caught.value)


def test_gate_condition_and_metric_are_checked(tmp_path: Path) -> None:
    text = (REPO / "configs/train/digits_mlp.yaml").read_text()
    message = _error(tmp_path, text.replace('accuracy: ">= 0.95"', 'acuracy: "about 0.95"'))
    assert "registration.gate (line" in message
    assert "'acuracy' is not a test metric; use one of accuracy, loss" in message
    message = _error(tmp_path, text.replace('">= 0.95"', '"0.95"'))
    assert (
        "condition '0.95' for 'accuracy' must be an operator and a number, e.g. '>= 0.95'"
        in message
    )


def test_gate_failures_read_as_sentences() -> None:
    config = loader.load(REPO / "configs/train/digits_mlp.yaml", TrainConfig)
    assert config.registration is not None
    assert config.registration.failures({"accuracy": 0.97, "loss": 0.1}) == []
    assert config.registration.failures({"accuracy": 0.9, "loss": 0.1}) == [
        "test accuracy 0.9000 is not >= 0.95"
    ]


def test_gpu_config_selects_gpus_and_nccl_path() -> None:
    config = loader.load(REPO / "configs/train/digits_mlp_gpu.yaml", TrainConfig)
    scaling = config.scaling.scaling_config()
    assert scaling.use_gpu is True and scaling.num_workers == 4
    assert scaling.resources_per_worker == {"CPU": 4, "GPU": 1}
    assert config.checkpoint.checkpoint_config().num_to_keep == 3


def test_gpu_resources_without_use_gpu(tmp_path: Path) -> None:
    text = (REPO / "configs/train/digits_mlp.yaml").read_text()
    message = _error(tmp_path, text.replace("{CPU: 0.5}", "{CPU: 0.5, GPU: 1}"))
    assert "asks for GPUs but scaling.use_gpu is false" in message


def test_dataset_splits_must_add_up(tmp_path: Path) -> None:
    message = _error(
        tmp_path,
        "kind: dataset\nname: d\nsource: {type: generated, rows: 100}\n"
        "splits: {train: 0.5, validation: 0.1, test: 0.1}\n",
    )
    assert (
        "splits (line 4): train + validation + test = 0.7; the fractions must add up to 1"
        in message
    )


def test_dataset_source_type_is_a_discriminated_union(tmp_path: Path) -> None:
    message = _error(tmp_path, "kind: dataset\nname: d\nsource: {type: mnist}\n")
    assert (
        "source (line 3): Input tag 'mnist' found using 'type' does not match any of the "
        "expected tags: 'sklearn_digits', 'generated', 'file'" in message
    )


def test_placement_problem() -> None:
    nodes = [{"CPU": 1.0}, {"CPU": 2.0}, {"CPU": 2.0}]
    assert placement.problem(nodes, {"CPU": 0.5}, 10) is None
    assert placement.problem(nodes, {"CPU": 2}, 2) is None
    assert placement.problem(nodes, {"CPU": 2}, 3) == (
        "3 workers with {CPU=2} each can never be placed: the cluster's nodes fit 2 "
        "(cluster total CPU=5)"
    )
    assert placement.problem(nodes, {"CPU": 1, "GPU": 1}, 1) is not None
