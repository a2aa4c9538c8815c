"""engine: vllm — LLMArgs mapped onto Ray Serve LLM's LLMConfig, without vLLM or a GPU."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from pydantic import ValidationError

from aiaas import errors, registry
from aiaas.serving import apps, vllm_engine

SOURCE = "/data/aiaas/mlflow/artifacts/1/models/m-1/artifacts/hf"


def _version(context_length: str = "8192", model_format: str = "hf-causal-lm") -> registry.Version:
    return registry.Version(
        name="smollm2",
        version="3",
        run_id="r1",
        created=0.0,
        tags={
            registry.FORMAT_TAG: model_format,
            registry.READY_TAG: "true",
            registry.ARTIFACT_DIGEST_TAG: "ab" * 32,
            f"{registry.LINEAGE_PREFIX}context_length": context_length,
        },
        source="models:/m-1",
    )


def _args(**fields: Any) -> apps.LLMArgs:
    return apps.LLMArgs.model_validate(
        {"models": [{"name": "chat", "model": "smollm2@production"}], "engine": "vllm", **fields}
    )


def _mapped(args: apps.LLMArgs, version: registry.Version | None = None, **kw: Any) -> dict:
    return vllm_engine.llm_config(args, args.models[0], version or _version(), SOURCE, **kw)


def _ray_llm_config() -> Any:
    """Ray's LLMConfig. ``ray.serve.llm`` refuses to import without vLLM (as here); the class
    it re-exports (a subclass adding nothing) imports without it."""
    try:
        from ray.serve.llm import LLMConfig
    except ImportError:
        from ray.llm._internal.serve.core.configs.llm_config import LLMConfig
    return LLMConfig


def test_defaults_map_onto_llm_config() -> None:
    assert _mapped(_args()) == {
        "model_loading_config": {"model_id": "chat", "model_source": SOURCE},
        "accelerator_type": None,
        "engine_kwargs": {
            "load_format": "safetensors",
            "tensor_parallel_size": 1,
            "pipeline_parallel_size": 1,
            "gpu_memory_utilization": 0.9,
            "dtype": "auto",
            "max_num_seqs": 8,
            "override_generation_config": {"max_new_tokens": 256},
            "max_model_len": 8192,
        },
        "deployment_config": {"max_ongoing_requests": 40},
    }


def test_options_and_limits_reach_the_engine() -> None:
    args = _args(
        max_running=64,
        max_queued=128,
        max_context_tokens=4096,
        default_max_tokens=512,
        vllm={
            "accelerator_type": "L4",
            "tensor_parallel_size": 4,
            "pipeline_parallel_size": 2,
            "gpu_memory_utilization": 0.85,
            "dtype": "bfloat16",
            "engine_kwargs": {
                "enable_prefix_caching": True,
                "load_format": "runai_streamer",
                "override_generation_config": {"temperature": 0.2},
            },
        },
    )
    mapped = _mapped(args)
    assert mapped["accelerator_type"] == "L4"
    assert mapped["engine_kwargs"] == {
        "load_format": "runai_streamer",
        "enable_prefix_caching": True,
        "tensor_parallel_size": 4,
        "pipeline_parallel_size": 2,
        "gpu_memory_utilization": 0.85,
        "dtype": "bfloat16",
        "max_num_seqs": 64,
        "override_generation_config": {"temperature": 0.2, "max_new_tokens": 512},
        "max_model_len": 4096,
    }
    assert mapped["deployment_config"] == {"max_ongoing_requests": 192}


def test_context_length_comes_from_the_lineage_unless_configured() -> None:
    assert _mapped(_args(), _version("2048"))["engine_kwargs"]["max_model_len"] == 2048
    # Unrecorded ("0"): vLLM reads it from the model's config.json itself.
    assert "max_model_len" not in _mapped(_args(), _version("0"))["engine_kwargs"]
    assert (
        _mapped(_args(max_context_tokens=1024), _version("0"))["engine_kwargs"]["max_model_len"]
        == 1024
    )


def test_a_context_beyond_the_model_is_refused() -> None:
    with pytest.raises(errors.ConfigError) as caught:
        _mapped(_args(max_context_tokens=4096), _version("2048"))
    assert str(caught.value) == (
        "max_context_tokens: 4096 exceeds the context length of smollm2:3 (2048 tokens), "
        "which models[chat] serves\n"
        "Set max_context_tokens to 2048 or less, or leave it out."
    )


def test_only_causal_lms_are_mapped() -> None:
    with pytest.raises(errors.ConfigError, match="is a 'onnx' model, not a causal LM"):
        _mapped(_args(), _version(model_format="onnx"))


def test_deployment_options_pass_through_and_autoscaling_targets_a_full_batch() -> None:
    mapped = _mapped(
        _args(max_running=16),
        deployment={
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 4},
            "max_ongoing_requests": 5,
            "ray_actor_options": {"num_cpus": 2},
        },
    )
    assert mapped["deployment_config"] == {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16},
        "max_ongoing_requests": 48,
        "ray_actor_options": {"num_cpus": 2},
    }
    chosen = {"autoscaling_config": {"max_replicas": 2, "target_ongoing_requests": 3}}
    assert _mapped(_args(), deployment=chosen)["deployment_config"]["autoscaling_config"] == {
        "max_replicas": 2,
        "target_ongoing_requests": 3,
    }


@pytest.mark.parametrize(
    "deployment",
    [None, {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}, {"num_replicas": 2}],
)
def test_ray_serve_llm_accepts_the_mapping(deployment: dict[str, Any] | None) -> None:
    args = _args(
        max_context_tokens=4096,
        vllm={"accelerator_type": "A10G", "tensor_parallel_size": 2},
    )
    config = _ray_llm_config().model_validate(_mapped(args, deployment=deployment))
    assert config.model_id == "chat"
    assert config.model_loading_config.model_source == SOURCE
    assert config.max_request_context_length == 4096
    assert config.accelerator_type == "A10G"
    assert config.engine_kwargs["tensor_parallel_size"] == 2
    assert config.deployment_config["max_ongoing_requests"] == 40


def test_ray_serve_llm_rejects_an_unknown_accelerator() -> None:
    args = _args(vllm={"accelerator_type": "NOT-A-GPU"})
    with pytest.raises(ValidationError, match="Unsupported accelerator type: NOT-A-GPU"):
        _ray_llm_config().model_validate(_mapped(args))


@pytest.mark.parametrize(
    ("uri", "root", "expected"),
    [
        (
            "mlflow-artifacts:/1/models/m-1/artifacts",
            "/data/aiaas",
            "/data/aiaas/mlflow/artifacts/1/models/m-1/artifacts/hf",
        ),
        (
            "mlflow-artifacts:/1/models/m-1/artifacts",
            "file:///data/aiaas/",
            "/data/aiaas/mlflow/artifacts/1/models/m-1/artifacts/hf",
        ),
        (
            "mlflow-artifacts:/1/models/m-1/artifacts",
            "s3://bucket/aiaas/",
            "s3://bucket/aiaas/mlflow/artifacts/1/models/m-1/artifacts/hf",
        ),
        ("gs://b/x/artifacts/", "/data/aiaas", "gs://b/x/artifacts/hf"),
        (
            "file:///tmp/mlruns/0/models/m-1/artifacts",
            "/data",
            "/tmp/mlruns/0/models/m-1/artifacts/hf",
        ),
        ("/tmp/mlruns/0/models/m-1/artifacts", "/data", "/tmp/mlruns/0/models/m-1/artifacts/hf"),
    ],
)
def test_model_source_is_where_gpu_nodes_read_the_artifact(
    uri: str, root: str, expected: str
) -> None:
    assert vllm_engine.model_source(uri, root) == expected


def test_a_model_source_vllm_cannot_read_is_refused() -> None:
    with pytest.raises(errors.ConfigError) as caught:
        vllm_engine.model_source("dbfs:/models/m-1/artifacts", "/data")
    assert str(caught.value) == (
        "engine: vllm cannot load the model at dbfs:/models/m-1/artifacts: vLLM reads local "
        "paths and Ray Serve LLM downloads s3://, gs://, abfss://, azure:// URIs\n"
        "Use a storage root on a filesystem every GPU node mounts, or an s3:// or gs:// storage "
        "root, and register the model there."
    )


def test_build_app_without_vllm_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a machine without vLLM, even where it is installed.
    monkeypatch.setitem(sys.modules, "ray.serve.llm", None)
    with pytest.raises(errors.ConfigError) as caught:
        vllm_engine.build_app(_args(), {"chat": _version()})
    assert str(caught.value) == (
        "engine: vllm needs Ray Serve LLM and vLLM, which this node cannot import (import of "
        "ray.serve.llm halted; None in sys.modules)\n"
        "pip install 'ray[llm]' vllm on GPU nodes (the 'vllm' extra of aiaas), or set engine: "
        "transformers."
    )
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


def test_importing_the_module_imports_neither_ray_serve_llm_nor_vllm() -> None:
    code = (
        "import sys; import aiaas.serving.vllm_engine; "
        "print(sorted(m for m in ('ray.serve.llm', 'vllm') if m in sys.modules))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert found.stdout.strip() == "[]"


def test_engine_kwargs_that_aiaas_sets_are_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        _args(
            vllm={
                "engine_kwargs": {
                    "max_num_seqs": 4,
                    "tensor_parallel_size": 2,
                    "override_generation_config": {"max_new_tokens": 9},
                }
            }
        )
    (error,) = caught.value.errors(include_url=False)
    assert error["loc"] == ("vllm", "engine_kwargs")
    assert error["msg"] == (
        "Value error, 'tensor_parallel_size' is set by vllm.tensor_parallel_size; 'max_num_seqs' "
        "is set by max_running; 'override_generation_config.max_new_tokens' is set by "
        "default_max_tokens: set those fields instead"
    )


def test_api_keys_are_refused_with_vllm_which_would_not_check_them() -> None:
    with pytest.raises(ValidationError) as caught:
        _args(api_keys_file="serve/keys.json")
    (error,) = caught.value.errors(include_url=False)
    assert error["loc"] == ("api_keys_file",)
    assert "checks no API keys" in error["msg"]
    keyed = apps.LLMArgs.model_validate(
        {"models": [{"name": "chat", "model": "m@p"}], "api_keys_file": "serve/keys.json"}
    )
    assert keyed.engine == "transformers"
