"""Our Serve apps that serve registered versions: their import paths, deployment names, status
routes and ``Args`` (the ``args:`` of their entry in a Serve config file).

The one place these are spelled: each ``serve_apps`` module takes its ``Args`` and deployment
name from here, the config loader checks a Serve file's ``args`` with these models, and the
control plane finds an app's pins and status routes through :data:`MODEL_APPS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

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
        0.002, ge=0, le=1, description="longest wait for a batch to fill"
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
        0.005, ge=0, le=1, description="longest wait for a batch to fill"
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


@dataclass(frozen=True)
class ModelApp:
    """One of our Serve apps that serves registered versions, and how to reach its models."""

    import_path: str
    deployment: str
    formats: tuple[str, ...]
    status_path: str  # GET, relative to the route prefix
    call: str  # what clients call, relative to the route prefix
    args: type[AppArgs]

    def status_url(self, base: str, prefix: str, name: str) -> str:
        """The status route of model ``name`` behind Serve's proxy at ``base``."""
        return f"{base}{prefix.rstrip('/')}{self.status_path.format(name=name)}"

    def call_line(self, base: str, prefix: str, name: str) -> str:
        """What clients call for model ``name``, e.g. ``POST http://…/v1/models/digits:predict``."""
        method, path = self.call.format(name=name).split(" ", 1)
        return f"{method} {base}{prefix.rstrip('/')}{path}"

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
)
#: Our apps that serve registered versions, by import path.
MODEL_APPS = {app.import_path: app for app in (MODEL_SERVER, EMBEDDINGS)}


def by_import_path(import_path: str) -> ModelApp | None:
    """The app an ``import_path`` names (``module:attr`` or, as Serve also takes,
    ``module.attr``); None for any other app."""
    dotted = import_path.replace(":", ".")
    return next((a for p, a in MODEL_APPS.items() if p.replace(":", ".") == dotted), None)


def kind_of(app: ServeApplicationSchema) -> ModelApp | None:
    """Which of our apps a Serve app config runs; None for any other app."""
    return by_import_path(app.import_path)
