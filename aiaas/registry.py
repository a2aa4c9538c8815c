"""The model registry: MLflow's, reached at the tracking server ``cluster up`` starts.

Only this module, :mod:`aiaas.registration` (writes) and :mod:`aiaas.aliases` talk to MLflow,
so the rest of aiaas speaks of versions, formats and lineage, not of MLflow's client API.

A version becomes *servable* only when its last registration step has run (the ``aiaas.ready``
tag). A registration that dies half-way leaves a version without it, which ``models list`` shows
as incomplete and which nothing promotes or serves.
"""

from __future__ import annotations

import datetime
import difflib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiaas import errors
from aiaas.model_ref import ModelRef as ModelRef
from aiaas.model_ref import parse_ref as parse_ref

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from aiaas.config.cluster import ClusterConfig

#: Tag keys of a version's lineage, shown by `aiaas models show`.
LINEAGE_PREFIX = "aiaas."
READY_TAG = f"{LINEAGE_PREFIX}ready"
FORMAT_TAG = f"{LINEAGE_PREFIX}format"
#: SHA-256 of the artifact's manifest (see :mod:`aiaas.artifact_digests`), checked before loading.
ARTIFACT_DIGEST_TAG = f"{LINEAGE_PREFIX}artifact_sha256"
#: Where ``cluster up``'s MLflow server keeps artifacts under the storage root (its
#: ``--artifacts-destination``): the files behind an ``mlflow-artifacts:/`` URI.
ARTIFACT_STORE = ("mlflow", "artifacts")
#: Formats a version's artifact can have; serving loads each (see :mod:`aiaas.artifacts`).
FORMATS = (
    "torch",
    "dynamic-int8",
    "torchscript",
    "onnx",
    "sentence-transformers",
    "hf-causal-lm",
    "hf-lora-adapter",
)


@dataclass
class Version:
    """A registered model version as aiaas shows it."""

    name: str
    version: str
    run_id: str
    created: float
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    source: str = ""

    @property
    def ready(self) -> bool:
        """True once registration finished; only ready versions are promoted or served."""
        return self.tags.get(READY_TAG) == "true"

    @property
    def format(self) -> str:
        return self.tags.get(FORMAT_TAG, "torch")

    @property
    def artifact_sha256(self) -> str:
        """The digest of the artifact's manifest, recorded at registration ("" before aiaas
        recorded one)."""
        return self.tags.get(ARTIFACT_DIGEST_TAG, "")

    @property
    def lineage(self) -> dict[str, str]:
        """The ``aiaas.*`` tags without the prefix (job id, data set fingerprint, parent, ...)."""
        return {
            key[len(LINEAGE_PREFIX) :]: value
            for key, value in self.tags.items()
            if key.startswith(LINEAGE_PREFIX)
        }

    @property
    def created_text(self) -> str:
        return datetime.datetime.fromtimestamp(self.created).strftime("%Y-%m-%d %H:%M:%S")

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def pin(self) -> dict[str, str]:
        """What a Serve replica needs to load this version without asking the registry."""
        return {
            "model": self.name,
            "version": self.version,
            "run_id": self.run_id,
            "source": self.source,
            "format": self.format,
            # A replica checks its copy of the artifact against this, without the registry.
            "artifact_sha256": self.artifact_sha256,
            "created": str(self.created),  # what GET /v1/models reports as "created"
        }

    @classmethod
    def from_pin(cls, pin: dict[str, Any]) -> Version:
        """The version a :meth:`pin` describes (registration finished: only those are pinned).

        Raises:
            KeyError: The pin lacks a field (one written before pins carried the artifact
                digest, say), so the caller asks the registry instead.
        """
        return cls(
            name=str(pin["model"]),
            version=str(pin["version"]),
            run_id=str(pin["run_id"]),
            created=float(pin.get("created") or 0.0),
            tags={
                FORMAT_TAG: str(pin["format"]),
                READY_TAG: "true",
                ARTIFACT_DIGEST_TAG: str(pin["artifact_sha256"]),
            },
            source=str(pin["source"]),
        )


def tracking_uri() -> str:
    """The MLflow tracking URI from the environment (set on every node by ``cluster up``)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise errors.ClusterError(
            "MLFLOW_TRACKING_URI is not set, so there is no registry to register in",
            "Start the cluster with 'aiaas cluster up' (it starts MLflow), or export "
            "MLFLOW_TRACKING_URI.",
        )
    return uri


def server_url(cluster: ClusterConfig) -> str:
    """The cluster's MLflow registry URL, checked to answer; nothing else changes.

    Raises:
        ClusterError: MLflow is disabled in the cluster config or not answering.
    """
    import httpx

    url = cluster.mlflow_url()
    if url is None:
        raise errors.ClusterError(
            f"the cluster '{cluster.name}' has MLflow disabled, so it has no model registry",
            "Set mlflow.enabled: true in the cluster config and run 'aiaas cluster up'.",
        )
    try:
        healthy = httpx.get(f"{url}/health", timeout=5, trust_env=False).status_code == 200
    except httpx.HTTPError:
        healthy = False
    if not healthy:
        raise errors.ClusterError(
            f"the model registry (MLflow) at {url} is not answering",
            "Start the cluster (it starts MLflow): aiaas cluster up",
        )
    return url


def use_server(url: str) -> None:
    """Point this process's MLflow at the registry at ``url`` (``MLFLOW_TRACKING_URI``, which
    :func:`tracking_uri` and MLflow's own ``models:/`` lookups read), failing fast.

    Called explicitly by a command that talks to the registry in-process, never at import.
    """
    os.environ["MLFLOW_TRACKING_URI"] = url
    # A command must fail fast, not retry a refused connection for minutes (MLflow's default).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def client(uri: str | None = None) -> MlflowClient:
    """An MLflow client of the registry at ``uri`` (default: MLFLOW_TRACKING_URI)."""
    import mlflow

    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def versions(model_name: str, uri: str | None = None) -> list[Version]:
    """Every version of a registered model, oldest first (incomplete ones included)."""
    mlflow_client = client(uri)
    model = registered_model(mlflow_client, model_name)
    if model is None:
        return []
    aliases: dict[str, list[str]] = {}
    for alias, number in (model.aliases or {}).items():
        aliases.setdefault(str(number), []).append(alias)
    found = mlflow_client.search_model_versions(f"name='{_quote(model_name)}'")
    result = [
        Version(
            name=model_name,
            version=str(v.version),
            run_id=str(v.run_id or ""),
            created=(v.creation_timestamp or 0) / 1000,
            aliases=aliases.get(str(v.version), []),
            tags=dict(v.tags),
            source=str(v.source or ""),
        )
        for v in found
    ]
    return sorted(result, key=lambda v: int(v.version))


def model_names(uri: str | None = None) -> list[str]:
    """Every registered model's name, sorted."""
    mlflow_client = client(uri)
    names: list[str] = []
    token = None
    while True:
        page = mlflow_client.search_registered_models(max_results=1000, page_token=token)
        names += [model.name for model in page]
        token = page.token
        if not token:
            return sorted(names)


def resolve(ref: ModelRef, uri: str | None = None, *, with_run: bool = False) -> Version:
    """The version a reference names; the latest ready version for a bare name.

    Raises:
        ConfigError: Unknown model, version or alias (the message lists what exists), or a
            version whose registration never finished.
    """
    require_model(ref.name, uri)
    found = versions(ref.name, uri)
    if ref.alias:
        held = [v for v in found if ref.alias in v.aliases]
        if not held:
            existing = sorted({alias for v in found for alias in v.aliases})
            raise errors.ConfigError(
                f"model '{ref.name}' has no alias '{ref.alias}'"
                + (f" (aliases: {', '.join(existing)})" if existing else " (it has no aliases)"),
                f"Set it with: aiaas models promote {ref.name} VERSION --alias {ref.alias}",
            )
        chosen = held[0]
    elif ref.version:
        by_number = {v.version: v for v in found}
        if ref.version not in by_number:
            raise errors.ConfigError(
                f"model '{ref.name}' has no version {ref.version} "
                f"(versions: {', '.join(by_number) or 'none'})",
                f"See them with: aiaas models list {ref.name}",
            )
        chosen = by_number[ref.version]
    else:
        ready = [v for v in found if v.ready]
        if not ready:
            raise errors.ConfigError(
                f"model '{ref.name}' has no complete version", "Train or import one first."
            )
        chosen = ready[-1]
    if not chosen.ready:
        raise errors.ConfigError(
            f"{chosen.name}:{chosen.version} never finished registering (no {READY_TAG} tag), "
            "so it is not servable",
            "Register the model again; this version stays hidden from serving.",
        )
    if with_run:
        _add_run(chosen, uri)
    return chosen


def require_model(name: str, uri: str | None = None) -> None:
    """Raises ConfigError (listing the models, with did-you-mean) when no model has that name."""
    if name not in model_names(uri):
        raise _unknown_model(name, uri)


def with_runs(found: list[Version], uri: str | None = None) -> list[Version]:
    """The versions with their run's metrics and params filled in."""
    for version in found:
        _add_run(version, uri)
    return found


def artifact_uri(version: Version, uri: str | None = None) -> str:
    """Where the artifact store holds the version's files, as MLflow names them: an
    ``mlflow-artifacts:/…`` URI behind ``cluster up``'s server (under :data:`ARTIFACT_STORE` of
    the storage root), a local path, or an object store URI."""
    return str(client(uri).get_model_version_download_uri(version.name, version.version))


def _add_run(version: Version, uri: str | None) -> None:
    if not version.run_id:
        return
    run = client(uri).get_run(version.run_id)
    version.metrics = {key: float(value) for key, value in run.data.metrics.items()}
    version.params = dict(run.data.params)


def registered_model(mlflow_client: MlflowClient, name: str) -> Any:
    """MLflow's registered model of that name, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _unknown_model(name: str, uri: str | None) -> errors.ConfigError:
    names = model_names(uri)
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return errors.ConfigError(
        f"no registered model '{name}'" + (f" (models: {', '.join(names)})" if names else ""),
        hint + "List them with: aiaas models list",
    )


def _quote(text: str) -> str:
    return text.replace("'", "\\'")
