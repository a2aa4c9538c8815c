"""Our Serve apps that serve registered versions: their import paths, deployment names, status
routes and ``Args`` (the ``args:`` of their entry in a Serve config file).

The one place these are spelled: each ``serve_apps`` module takes its ``Args`` and deployment
name from here, the config loader checks a Serve file's ``args`` with these models, and the
control plane finds an app's pins and status routes through :data:`MODEL_APPS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

if TYPE_CHECKING:
    from ray.serve.schema import ServeApplicationSchema


class ServedModel(BaseModel):
    """One model of an app: the name clients use and the registered version behind it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$", description="name clients use, e.g. 'digits'"
    )
    model: str = Field(description="NAME@ALIAS (follows promotions) or NAME:VERSION (pinned)")


class AppArgs(BaseModel):
    """What every app of registered versions takes: the models it serves."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[ServedModel] = Field(min_length=1, description="the models served")


class ModelServerArgs(AppArgs):
    """The model server's arguments (``serve_apps.model_server``)."""

    max_batch_size: int = Field(32, ge=1, le=1024, description="rows of requests per batch")
    batch_wait_timeout_s: float = Field(
        0.002,
        ge=0,
        le=1,
        description="longest wait for a batch to fill while other requests are in flight (a "
        "request alone in its replica is not held)",
    )
    max_instances: int = Field(1024, ge=1, description="instances per request (more: 413)")
    max_payload_bytes: int = Field(1_048_576, ge=1024, description="request body limit (413)")
    max_pending: int = Field(
        256, ge=1, description="requests waiting in one replica before it answers 503"
    )
    request_timeout_s: float = Field(10.0, gt=0, description="per-request limit (504)")
    api_keys_file: str | None = Field(
        None,
        description="key file under the storage root (aiaas serve keys create); when set, "
        "every predict call needs 'Authorization: Bearer <key>'",
    )
    threads: int = Field(1, ge=1, le=64, description="intra-op threads per replica")


class EmbeddingsArgs(AppArgs):
    """The embeddings app's arguments (``serve_apps.embeddings``)."""

    models: list[ServedModel] = Field(
        min_length=1, description="embedding models served; 'name' is the request's 'model'"
    )
    max_batch_size: int = Field(64, ge=1, le=1024, description="texts per batched forward pass")
    batch_wait_timeout_s: float = Field(
        0.005,
        ge=0,
        le=1,
        description="longest wait for a batch to fill while other requests are in flight (a "
        "request alone in its replica is not held)",
    )
    max_inputs: int = Field(256, ge=1, description="texts per request (more: 413)")
    max_payload_bytes: int = Field(2_097_152, ge=1024, description="request body limit (413)")
    max_pending: int = Field(
        256, ge=1, description="requests waiting in one replica before it answers 503"
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="per-request limit, body included (408 reading, 504 answering)"
    )
    api_keys_file: str | None = Field(
        None, description="key file under the storage root; when set, calls need a Bearer key"
    )
    threads: int = Field(1, ge=1, le=64, description="intra-op threads per replica")


#: vLLM engine arguments ``engine: vllm`` sets from aiaas's own fields, and the field to use
#: instead: one setting has one place (``aiaas.serving.vllm_engine`` writes them).
VLLM_SET_BY_AIAAS = {
    "model": "models[].model",
    "served_model_name": "models[].name",
    "tensor_parallel_size": "vllm.tensor_parallel_size",
    "pipeline_parallel_size": "vllm.pipeline_parallel_size",
    "gpu_memory_utilization": "vllm.gpu_memory_utilization",
    "dtype": "vllm.dtype",
    "max_model_len": "max_context_tokens",
    "max_num_seqs": "max_running",
}


class VLLMOptions(BaseModel):
    """What ``engine: vllm`` passes on to Ray Serve LLM (GPU nodes with vLLM installed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    accelerator_type: str | None = Field(
        None, description="Ray accelerator type the replicas need, e.g. 'A10G' or 'L4'"
    )
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs per replica (TP)")
    pipeline_parallel_size: int = Field(1, ge=1, le=64, description="pipeline stages per replica")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="share of each GPU's memory vLLM may take"
    )
    dtype: str = Field("auto", description="vLLM's dtype: auto, bfloat16, float16, float32")
    engine_kwargs: dict[str, object] = Field(
        default_factory=dict, description="more vLLM engine arguments, passed as they are"
    )

    @field_validator("engine_kwargs")
    @classmethod
    def _not_set_by_aiaas(cls, value: dict[str, object]) -> dict[str, object]:
        taken = [
            f"'{key}' is set by {field}" for key, field in VLLM_SET_BY_AIAAS.items() if key in value
        ]
        generation = value.get("override_generation_config")
        if isinstance(generation, dict) and "max_new_tokens" in generation:
            taken.append("'override_generation_config.max_new_tokens' is set by default_max_tokens")
        if taken:
            raise ValueError(f"{'; '.join(taken)}: set those fields instead")
        return value


#: The projections a served LoRA adapter may change unless a config names others (Llama's).
ADAPTER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LLMServedModel(ServedModel):
    """A model of the LLM app: a causal LM, or a LoRA adapter served on one of them."""

    adapter_of: str | None = Field(
        None,
        description="for a LoRA adapter version (aiaas finetune): the 'name' of the entry whose "
        "replicas serve it, beside that base model",
    )


class LLMArgs(AppArgs):
    """The LLM app's arguments (``serve_apps.llm``): OpenAI chat and completions."""

    models: list[LLMServedModel] = Field(  # type: ignore[assignment]
        min_length=1,
        description="causal LM versions and LoRA adapters served; 'name' is the request's 'model'",
    )
    engine: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="transformers: continuous batching on CPU or GPU in the replica; vllm: "
        "Ray Serve LLM's vLLM engine (GPU nodes, vLLM installed)",
    )
    max_running: int = Field(
        8, ge=1, le=1024, description="sequences one replica generates at once (its batch)"
    )
    max_queued: int = Field(
        32, ge=0, le=100_000, description="requests waiting beyond max_running (more: 503)"
    )
    max_context_tokens: int | None = Field(
        None,
        ge=16,
        description="prompt + output tokens per request (more: 400); default: the model's "
        "context length",
    )
    default_max_tokens: int = Field(
        256, ge=1, description="output tokens when a request names no max_tokens"
    )
    kv_cache_tokens: int = Field(
        16_384,
        ge=256,
        description="tokens the engine's paged KV cache holds, all sequences together",
    )
    prefill_chunk_tokens: int = Field(
        512, ge=16, description="most prompt tokens one engine step takes in (chunked prefill)"
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="per-request limit from arrival to the last token (504)"
    )
    max_payload_bytes: int = Field(1_048_576, ge=1024, description="request body limit (413)")
    api_keys_file: str | None = Field(
        None, description="key file under the storage root; when set, calls need a Bearer key"
    )
    threads: int = Field(2, ge=1, le=256, description="intra-op threads per replica")
    use_gpu: bool = Field(
        False, description="transformers engine: run on the replica's GPU (give it num_gpus)"
    )
    vllm: VLLMOptions = Field(
        default_factory=VLLMOptions, description="engine: vllm only (Ray Serve LLM's LLMConfig)"
    )
    max_adapters_per_replica: int = Field(
        4,
        ge=1,
        le=256,
        description="LoRA adapters one replica keeps loaded (least recently used go first; "
        "Ray Serve's model multiplexing)",
    )
    max_adapter_rank: int = Field(
        16,
        ge=1,
        le=1024,
        description="largest LoRA rank served: each adapter slot is this wide (for SmolLM2 "
        "~1.3 MB per rank unit on every projection)",
    )
    adapter_targets: list[str] = Field(
        default_factory=lambda: list(ADAPTER_TARGETS),
        min_length=1,
        description="the base model's projections adapters may change",
    )

    @field_validator("models")
    @classmethod
    def _adapters_of_served_bases(cls, value: list[LLMServedModel]) -> list[LLMServedModel]:
        names = [entry.name for entry in value]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"model names must differ; {', '.join(twice)} is used twice")
        bases = {entry.name for entry in value if entry.adapter_of is None}
        for entry in value:
            if entry.adapter_of is not None and entry.adapter_of not in bases:
                raise ValueError(
                    f"'{entry.name}' is an adapter of '{entry.adapter_of}', which is no base "
                    f"model of this app (its base models: {', '.join(sorted(bases)) or 'none'})"
                )
        return value

    @model_validator(mode="after")
    def _adapters_need_our_engine(self) -> LLMArgs:
        if self.engine == "vllm" and self.serves_adapters:
            raise ValueError(
                "engine: vllm serves no registered LoRA adapters here yet; serve them with "
                "engine: transformers"
            )
        return self

    @property
    def serves_adapters(self) -> bool:
        return any(entry.adapter_of for entry in self.models)

    @field_validator("api_keys_file")
    @classmethod
    def _keys_need_our_server(cls, value: str | None, info: ValidationInfo) -> str | None:
        # Ray Serve LLM's OpenAI ingress checks no keys: accepting the file would serve the
        # models to anyone while the config says they are protected.
        if value is not None and info.data.get("engine") == "vllm":
            raise ValueError(
                "engine: vllm serves through Ray Serve LLM's ingress, which checks no API keys; "
                "use engine: transformers, or drop api_keys_file and authenticate in front of "
                "Serve"
            )
        return value


@dataclass(frozen=True)
class ModelApp:
    """One of our Serve apps that serves registered versions, and how to reach its models."""

    import_path: str
    deployment: str
    formats: tuple[str, ...]
    status_path: str  # GET, relative to the route prefix
    call: str  # what clients call, relative to the route prefix
    args: type[AppArgs]
    #: A first path segment the app may carry in its route prefix instead (the embeddings app
    #: at ``/v1/embeddings`` beside the LLM app at ``/v1``): then the paths start after it.
    segment: str = ""

    def _path(self, prefix: str, path: str) -> str:
        prefix = prefix.rstrip("/")
        if self.segment and prefix.endswith(self.segment) and path.startswith(self.segment):
            path = path[len(self.segment) :] or "/"
        return f"{prefix}{path}"

    def status_url(self, base: str, prefix: str, name: str) -> str:
        """The status route of model ``name`` behind Serve's proxy at ``base``."""
        return base + self._path(prefix, self.status_path.format(name=name))

    def call_line(self, base: str, prefix: str, name: str) -> str:
        """What clients call for model ``name``, e.g. ``POST http://…/v1/models/digits:predict``."""
        method, path = self.call.format(name=name).split(" ", 1)
        return f"{method} {base}{self._path(prefix, path)}"

    def args_of(self, app: ServeApplicationSchema) -> AppArgs:
        """The app's typed ``args`` (checked by the loader before any deploy)."""
        return self.args.model_validate(app.args or {})


CLASSIFIER_FORMATS = ("torch", "dynamic-int8", "torchscript", "onnx")
MODEL_SERVER = ModelApp(
    import_path="serve_apps.model_server:build_app",
    deployment="ModelServer",
    formats=CLASSIFIER_FORMATS,
    status_path="/{name}",
    call="POST /{name}:predict",
    args=ModelServerArgs,
)
EMBEDDINGS = ModelApp(
    import_path="serve_apps.embeddings:build_app",
    deployment="Embeddings",
    formats=("sentence-transformers",),
    status_path="/embeddings/{name}",
    call="POST /embeddings",
    args=EmbeddingsArgs,
    segment="/embeddings",
)
LLM = ModelApp(
    import_path="serve_apps.llm:build_app",
    deployment="LLMServer",
    formats=("hf-causal-lm", "hf-lora-adapter"),
    status_path="/llm/{name}",
    call="POST /chat/completions",
    args=LLMArgs,
)
#: Our apps that serve registered versions, by import path.
MODEL_APPS = {app.import_path: app for app in (MODEL_SERVER, EMBEDDINGS, LLM)}
#: The deployments whose models ``GET /v1/models`` lists (each answers ``openai_models``).
OPENAI_DEPLOYMENTS = (EMBEDDINGS.deployment, LLM.deployment)


def by_import_path(import_path: str) -> ModelApp | None:
    """The app an ``import_path`` names (``module:attr`` or, as Serve also takes,
    ``module.attr``); None for any other app."""
    dotted = import_path.replace(":", ".")
    return next((a for p, a in MODEL_APPS.items() if p.replace(":", ".") == dotted), None)


def kind_of(app: ServeApplicationSchema) -> ModelApp | None:
    """Which of our apps a Serve app config runs; None for any other app."""
    return by_import_path(app.import_path)
