"""Fine-tuning configs and plans: messages users see, the steps, the schedule, the GPU path, the
gate's decision, and how the CLI shows a run's progress and outcome."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from aiaas import errors
from aiaas.config import loader
from aiaas.config.finetune import FinetuneConfig, ScheduleSpec
from jobs import finetune_gate, finetune_plan, outcomes

REPO = Path(__file__).resolve().parents[2]
LORA = REPO / "configs/finetune/smollm2_iso_dates_lora.yaml"
GPU = REPO / "configs/finetune/smollm2_iso_dates_lora_gpu.yaml"
TINY = REPO / "configs/finetune/tiny/smollm2_iso_dates_lora.yaml"


def _problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "f.yaml"
    path.write_text(text)
    with pytest.raises(errors.ConfigError) as caught:
        loader.load(path, FinetuneConfig)
    lines = str(caught.value).splitlines()
    assert lines[0].startswith(f"{path}: not a valid finetune config")
    return lines[1:]


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("rank: 16", "rnak: 16", "  • lora.rnak (line 12): unknown field; did you mean 'rank'?"),
        (
            "base_model: smollm2@production",
            "base_model: smollm2",
            "  • base_model (line 8): 'smollm2' names no version; write NAME:VERSION or "
            "NAME@ALIAS (e.g. smollm2@production)",
        ),
        (
            "max_steps: 100",
            "max_steps: 100\nepochs: 2",
            "  • max_steps (line 21): set either epochs or max_steps, not both",
        ),
        (
            "warmup_steps: 10",
            "warmup_steps: 100",
            "  • max_steps (line 21): schedule.warmup_steps (100) must be below max_steps "
            "(100); shorten the warm-up",
        ),
        (
            "[q_proj, k_proj, v_proj, o_proj]",
            "[q_proj, o-proj]",
            "  • lora.target_modules (line 15): 'o-proj' is not a module name; use names such "
            "as q_proj or self_attn.q_proj",
        ),
        (
            "[q_proj, k_proj, v_proj, o_proj]",
            "[q_proj, q_proj]",
            "  • lora.target_modules (line 15): q_proj listed more than once; list each once",
        ),
        (
            "method: lora",
            "method: full",
            "  • lora (line 11): applies to method: lora only; drop the lora section or set "
            "method: lora",
        ),
        (
            "strategy: ddp",
            "strategy: fsdp",
            "  • scaling.strategy (line 26): fsdp shards the model over GPUs and needs "
            "scaling.use_gpu: true (Ray Train runs FSDP on CUDA only); use strategy: ddp on CPUs",
        ),
        (
            "resources_per_worker: {CPU: 1}",
            "resources_per_worker: {CPU: 1, GPU: 1}",
            "  • scaling.resources_per_worker (line 27): asks for GPUs but scaling.use_gpu is "
            "false; set use_gpu: true or drop GPU from resources_per_worker",
        ),
        (
            "min_exact_match: 0.8",
            "min_exact_match: 1.5",
            "  • registration.gate.min_exact_match (line 35): Input should be less than or "
            "equal to 1",
        ),
    ],
)
def test_a_bad_field_is_named_with_its_fix(
    tmp_path: Path, old: str, new: str, problem: str
) -> None:
    text = LORA.read_text()
    assert old in text
    assert _problems(tmp_path, text.replace(old, new, 1)) == [problem]


def test_a_run_needs_a_length_and_bf16_needs_gpus(tmp_path: Path) -> None:
    text = LORA.read_text()
    assert _problems(tmp_path, text.replace("max_steps: 100\n", "")) == [
        "  • max_steps (line 6): set epochs or max_steps: how long the run trains"
    ]
    assert _problems(tmp_path, text + "mixed_precision: bf16\n") == [
        "  • mixed_precision (line 38): bf16 is the GPU path and needs scaling.use_gpu: true; "
        "on CPUs leave mixed_precision unset (float32)"
    ]


def test_shipped_configs_describe_the_runs_the_issue_asks_for() -> None:
    config = loader.load(LORA, FinetuneConfig)
    assert (config.base.name, config.base.alias, config.dataset) == (
        "smollm2",
        "production",
        "iso-dates",
    )
    assert config.method == "lora" and 8 <= config.adapter.rank <= 16
    assert config.adapter.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert 1e-3 <= config.optimizer.lr <= 2e-3 and config.batch_size == 8
    assert config.max_steps == 100 and config.scaling.num_workers == 1
    assert config.scaling.threads() == 2
    tiny = loader.load(TINY, FinetuneConfig)
    assert tiny.max_steps is not None and tiny.max_steps <= 4
    assert tiny.registration is not None and tiny.registration.gate.min_exact_match == 0.0
    # A config without a lora section gets the default adapter.
    full = loader.load(REPO / "configs/finetune/tiny/smollm2_iso_dates_full.yaml", FinetuneConfig)
    assert full.method == "full" and full.lora is None and full.adapter.rank == 8


def test_the_gpu_path_is_fsdp_in_bf16_and_the_cpu_path_ddp_in_float32() -> None:
    cpu = finetune_plan.parallel_plan(loader.load(LORA, FinetuneConfig))
    assert cpu == finetune_plan.ParallelPlan(
        strategy="ddp",
        sharded=False,
        backend="gloo",
        device_type="cpu",
        autocast_dtype=None,
        fsdp_param_dtype=None,
    )
    gpu_config = loader.load(GPU, FinetuneConfig)
    gpu = finetune_plan.parallel_plan(gpu_config)
    assert gpu == finetune_plan.ParallelPlan(
        strategy="fsdp",
        sharded=True,
        backend="nccl",
        device_type="cuda",
        autocast_dtype="bfloat16",
        fsdp_param_dtype="bfloat16",
    )
    scaling = gpu_config.scaling.scaling_config()
    assert scaling.use_gpu is True and scaling.resources_per_worker == {"CPU": 4, "GPU": 1}
    # DDP on GPUs in bf16: autocast only, FSDP's own mixed precision does not apply.
    ddp_bf16 = gpu_config.model_copy(
        update={"scaling": gpu_config.scaling.model_copy(update={"strategy": "ddp"})}
    )
    plan = finetune_plan.parallel_plan(ddp_bf16)
    assert (plan.strategy, plan.autocast_dtype, plan.fsdp_param_dtype) == ("ddp", "bfloat16", None)
    one_gpu = gpu_config.model_copy(
        update={"scaling": gpu_config.scaling.model_copy(update={"num_workers": 1})}
    )
    assert finetune_plan.parallel_plan(one_gpu).sharded is False


def test_prepare_model_kwargs_and_autocast_follow_the_plan() -> None:
    import torch
    from torch.distributed.fsdp import MixedPrecision
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    with torch.device("meta"):
        model = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                vocab_size=64,
            )
        )
    cpu = finetune_plan.parallel_plan(loader.load(LORA, FinetuneConfig))
    assert finetune_plan.prepare_kwargs(cpu, model) == {"parallel_strategy": "ddp"}
    with finetune_plan.autocast(cpu):
        assert not torch.is_autocast_enabled("cpu")
    gpu = finetune_plan.parallel_plan(loader.load(GPU, FinetuneConfig))
    kwargs = finetune_plan.prepare_kwargs(gpu, model)
    assert kwargs["parallel_strategy"] == "fsdp"
    options = kwargs["parallel_strategy_kwargs"]
    assert options["use_orig_params"] is True and options["limit_all_gathers"] is True
    assert isinstance(options["auto_wrap_policy"], ModuleWrapPolicy)
    assert finetune_plan.block_classes(model) == {LlamaDecoderLayer}
    assert options["mixed_precision"] == MixedPrecision(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.bfloat16
    )
    # The same dtype on CPU shows the context is bf16 autocast (CUDA is not needed to build it).
    bf16_cpu = finetune_plan.ParallelPlan("ddp", False, "gloo", "cpu", "bfloat16", None)
    with finetune_plan.autocast(bf16_cpu):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_steps_fall_into_epochs_and_every_worker_takes_the_same_batches() -> None:
    config = loader.load(LORA, FinetuneConfig)
    steps = finetune_plan.step_plan(config, train_rows=300)
    # 300 rows / 8 per batch: 37 whole micro-batches, one optimizer step each.
    assert (steps.micro_batches_per_epoch, steps.steps_per_epoch) == (37, 37)
    assert (steps.total_steps, steps.epochs) == (100, 3)
    assert [s for s in range(1, 101) if steps.evaluates(s)] == [25, 50, 75, 100]
    assert [s for s in range(1, 101) if steps.checkpoints(s)] == [25, 50, 75, 100]
    assert (steps.epoch_of(36), steps.epoch_of(37), steps.epoch_of(99)) == (0, 1, 2)
    two = config.model_copy(
        update={
            "scaling": config.scaling.model_copy(update={"num_workers": 2}),
            "gradient_accumulation_steps": 2,
            "max_steps": None,
            "epochs": 2,
            "eval_every_steps": None,
        }
    )
    steps = finetune_plan.step_plan(two, train_rows=301)
    # 150 rows per worker, 18 micro-batches, 9 steps of 2 each; evaluated at each epoch's end.
    assert (steps.micro_batches_per_epoch, steps.steps_per_epoch, steps.total_steps) == (18, 9, 18)
    assert [s for s in range(1, 19) if steps.evaluates(s)] == [9, 18]
    with pytest.raises(errors.ConfigError) as caught:
        finetune_plan.step_plan(two, train_rows=31)
    assert str(caught.value) == (
        "the train split of 'iso-dates' has 31 rows, too few for one optimizer step of "
        "batch_size × gradient_accumulation_steps × num_workers = 32 rows\n"
        "Lower batch_size, gradient_accumulation_steps or scaling.num_workers, or prepare more "
        "rows."
    )


def test_the_learning_rate_warms_up_then_decays() -> None:
    cosine = ScheduleSpec(name="cosine", warmup_steps=4, min_lr_ratio=0.1)
    factors = [finetune_plan.lr_factor(step, 14, cosine) for step in range(14)]
    assert factors[:4] == [0.2, 0.4, 0.6, 0.8]  # never 0: the first step learns
    assert factors[4] == 1.0 and 0.1 < factors[-1] < 0.15  # the last step still learns
    assert math.isclose(finetune_plan.lr_factor(14, 14, cosine), 0.1)  # the floor, once done
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))
    linear = ScheduleSpec(name="linear")
    factors = [finetune_plan.lr_factor(s, 5, linear) for s in range(5)]
    assert factors == pytest.approx([1, 0.8, 0.6, 0.4, 0.2])
    constant = ScheduleSpec(name="constant", warmup_steps=1)
    assert [finetune_plan.lr_factor(s, 5, constant) for s in range(3)] == [0.5, 1.0, 1.0]


def test_lora_targets_match_by_the_end_of_a_module_path() -> None:
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "lm_head"]
    targets = ["q_proj", "self_attn.q_proj", "up_proj", "qproj", "attn.q_proj"]
    assert finetune_plan.unmatched_targets(names, targets) == ["qproj", "attn.q_proj"]


def _figures(eval_loss: float, matched: int) -> outcomes.GateFigures:
    return outcomes.GateFigures(
        eval_loss=eval_loss,
        base_eval_loss=1.5,
        exact_match=matched / 8,
        matched=matched,
        test_rows=8,
    )


def test_the_gate_wants_a_lower_loss_than_the_base_and_enough_exact_answers() -> None:
    config = loader.load(LORA, FinetuneConfig)
    assert config.registration is not None
    spec = config.registration.gate
    assert finetune_gate.failures(spec, _figures(0.9, 7)) == []
    assert finetune_gate.failures(spec, _figures(1.5, 6)) == [
        "validation loss 1.5000 is not below the base model's 1.5000",
        "test exact match 0.7500 (6 of 8) is not >= 0.8",
    ]
    assert finetune_gate.failures(spec, _figures(float("nan"), 8)) == [
        "validation loss nan is not below the base model's 1.5000"
    ]
    lenient = spec.model_copy(update={"eval_loss_below_base": False, "min_exact_match": 0.0})
    assert finetune_gate.failures(lenient, _figures(2.0, 0)) == []


def test_the_skill_scorer_comes_from_the_library() -> None:
    import importlib.util

    if importlib.util.find_spec("aiaas.skills") is not None:
        assert callable(finetune_gate.skill_score())
        return
    with pytest.raises(errors.ConfigError) as caught:
        finetune_gate.skill_score()
    assert str(caught.value).startswith("aiaas.skills is missing, so answers cannot be scored")


def test_the_cli_shows_steps_the_gate_and_the_outcome(capsys: pytest.CaptureFixture[str]) -> None:
    from aiaas import progress
    from aiaas_cli import submission

    printer = submission.progress_printer()
    events = [
        {
            "plan": {
                "base": "smollm2:1",
                "method": "lora",
                "steps": 4,
                "epochs": 2,
                "train_rows": 12,
            }
        },
        {"step": 0, "epoch": 0, "eval_loss": 2.5, "base_eval_loss": 2.5},
        {"step": 2, "epoch": 0, "train_loss": 2.1, "tokens_per_s": 812.4, "base_eval_loss": 2.5},
        {"resumed_from_step": 2},
        {
            "step": 4,
            "epoch": 1,
            "train_loss": 1.2,
            "eval_loss": 1.1,
            "base_eval_loss": 2.5,
            "tokens_per_s": 790.0,
        },
        {"gate": _figures(1.1, 6).record()},
    ]
    for event in events:
        printer(progress.format_event(event))
    assert capsys.readouterr().out.splitlines() == [
        "  plan: lora of smollm2:1, 4 steps (2 epochs of 12 train rows)",
        "  step     0  epoch   1  eval_loss 2.5000 (base 2.5000)",
        "  step     2  epoch   1  train_loss 2.1000  812 tokens/s",
        "  resumed from the checkpoint of step 2",
        "  step     4  epoch   2  train_loss 1.2000  eval_loss 1.1000 (base 2.5000)  790 tokens/s",
        "  gate: eval loss 1.1000 (base 1.5000), exact match 0.7500 (6/8)",
    ]
    outcome = outcomes.FinetuneOutcome(
        run="tiny",
        base="smollm2:1",
        method="lora",
        figures=_figures(1.1, 6),
        steps_run=4,
        history=[outcomes.StepMetrics(step=4, train_loss=1.2)],
        checkpoint="/runs/tiny/checkpoint_000001",
        registered=outcomes.RegisteredVersion(model="tiny-smollm2-skill", version="1"),
        gate="passed",
    )
    record = outcome.record()
    assert isinstance(outcomes.parse(record), outcomes.FinetuneOutcome)
    assert submission.summary(record) == (
        "eval loss 1.1000 (base 1.5000), exact match 0.7500 (6/8); registered tiny-smollm2-skill v1"
    )
