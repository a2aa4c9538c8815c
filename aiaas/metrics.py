"""Every metric aiaas exports, in one catalogue: names, kinds, labels, and their Prometheus names.

Metrics go through Ray's metrics API (``ray.util.metrics``), so each node's metrics endpoint
exports them beside Ray's own with Ray's ``ray_`` prefix (counters also get ``_total``).
Dashboards and alert rules are written against :attr:`Metric.series`, never against literals, so
a renamed metric cannot leave a panel silently empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["counter", "gauge", "histogram"]

_LATENCY_MS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_SECONDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60)


@dataclass(frozen=True)
class Metric:
    """One metric: what it counts, its labels and how Prometheus names it."""

    name: str
    kind: Kind
    description: str
    labels: tuple[str, ...]
    boundaries: tuple[float, ...] = ()
    #: A histogram observed per request at high rates: counted in the replica and exported as
    #: gauges with the same series names (:mod:`aiaas.replica_histogram`).
    in_replica: bool = False

    @property
    def series(self) -> str:
        """The name Prometheus stores (histograms add ``_bucket``/``_sum``/``_count``)."""
        return f"ray_{self.name}" + ("_total" if self.kind == "counter" else "")

    def create(self, serve: bool = False) -> Any:
        """The metric object; only inside a Ray worker, driver or actor.

        Args:
            serve: In a Serve replica: ``ray.serve.metrics`` adds the application, deployment,
                replica and route labels.
        """
        import importlib

        # Not ray.serve outside Serve: importing it costs a training worker half a second.
        metrics = importlib.import_module("ray.serve.metrics" if serve else "ray.util.metrics")

        # Ray annotates tag_keys as a 1-tuple; any tuple of strings works.
        labels: Any = self.labels
        if self.kind == "counter":
            return metrics.Counter(self.name, self.description, tag_keys=labels)
        if self.kind == "gauge":
            return metrics.Gauge(self.name, self.description, tag_keys=labels)
        if self.in_replica:
            from aiaas.replica_histogram import ReplicaHistogram

            def gauge(name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
                keys: Any = tag_keys
                return metrics.Gauge(name, description, tag_keys=keys)

            return ReplicaHistogram(
                self.name, self.description, self.boundaries, self.labels, gauge
            )
        return metrics.Histogram(self.name, self.description, list(self.boundaries), labels)


# Serving: the model server (serve_apps/model_server.py).
SERVE_REQUESTS = Metric(
    "aiaas_serve_requests",
    "counter",
    "Predict requests by model, version and HTTP status code.",
    ("model", "version", "code"),
)
SERVE_LATENCY = Metric(
    "aiaas_serve_request_latency_ms",
    "histogram",
    "Predict latency inside the replica, in milliseconds.",
    ("model", "version"),
    _LATENCY_MS,
    in_replica=True,
)
SERVE_BATCH_SIZE = Metric(
    "aiaas_serve_batch_size",
    "histogram",
    "Requests per executed batch.",
    ("model",),
    _BATCH,
    in_replica=True,
)
SERVE_PENDING = Metric(
    "aiaas_serve_pending_requests",
    "gauge",
    "Requests waiting or running in a replica.",
    ("model",),
)

# Serving: the embeddings app (serve_apps/embeddings.py).
EMBEDDINGS_REQUESTS = Metric(
    "aiaas_embeddings_requests",
    "counter",
    "Embedding requests by model, version and HTTP status code.",
    ("model", "version", "code"),
)
EMBEDDINGS_TOKENS = Metric(
    "aiaas_embeddings_tokens", "counter", "Tokens embedded, by model.", ("model",)
)
EMBEDDINGS_BATCH_SIZE = Metric(
    "aiaas_embeddings_batch_size",
    "histogram",
    "Texts per executed batch.",
    ("model",),
    _BATCH,
    in_replica=True,
)

# Serving: the LLM app (serve_apps/llm.py). One observation per request, never per token: a
# histogram observed per token would put the dashboard agent's metrics path on the decode loop.
LLM_REQUESTS = Metric(
    "aiaas_llm_requests",
    "counter",
    "Chat and completion requests by model, version, endpoint (chat, completions) and HTTP code.",
    ("model", "version", "endpoint", "code"),
)
LLM_TTFT = Metric(
    "aiaas_llm_time_to_first_token_ms",
    "histogram",
    "From a request reaching the replica to its first output token, in milliseconds.",
    ("model", "version"),
    (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000),
)
LLM_INTER_TOKEN = Metric(
    "aiaas_llm_inter_token_latency_ms",
    "histogram",
    "A request's mean time between output tokens after the first, in milliseconds.",
    ("model", "version"),
    (5, 10, 20, 50, 100, 200, 500, 1000, 2000),
)
LLM_PROMPT_TOKENS = Metric(
    "aiaas_llm_prompt_tokens",
    "counter",
    "Prompt tokens of admitted requests, by model and version.",
    ("model", "version"),
)
LLM_OUTPUT_TOKENS = Metric(
    "aiaas_llm_output_tokens",
    "counter",
    "Tokens generated, by model and version (rate() is output tokens per second).",
    ("model", "version"),
)
LLM_RUNNING = Metric(
    "aiaas_llm_running_sequences",
    "gauge",
    "Sequences generating in a replica's engine, by model and version.",
    ("model", "version"),
)
LLM_WAITING = Metric(
    "aiaas_llm_waiting_sequences",
    "gauge",
    "Requests admitted by a replica and waiting for a place in its engine's batch.",
    ("model", "version"),
)

# Training: rank 0 of each Ray Train run, once per epoch (jobs/train.py) or per eval and
# checkpoint step (jobs/finetune.py: loss splits train, validation and validation_base).
TRAIN_SAMPLES_PER_S = Metric(
    "aiaas_train_samples_per_second",
    "gauge",
    "Training rows per second over the last epoch, all workers together.",
    ("run", "model"),
)
TRAIN_TOKENS_PER_S = Metric(
    "aiaas_train_tokens_per_second",
    "gauge",
    "Tokens per second since the last report of a fine-tuning run, all workers together.",
    ("run", "model"),
)
TRAIN_EPOCH = Metric("aiaas_train_epoch", "gauge", "The last finished epoch.", ("run", "model"))
TRAIN_LOSS = Metric(
    "aiaas_train_loss",
    "gauge",
    "Mean loss of the last epoch (fine-tuning: of the last report; validation_base is the base "
    "model's).",
    ("run", "model", "split"),
)
TRAIN_ACCURACY = Metric(
    "aiaas_train_accuracy", "gauge", "Accuracy of the last epoch.", ("run", "model", "split")
)
TRAIN_CHECKPOINT_SECONDS = Metric(
    "aiaas_train_checkpoint_seconds",
    "histogram",
    "Time to save and report an epoch's checkpoint.",
    ("run", "model"),
    _SECONDS,
)

# The cluster exporter (cluster/exporter.py): state polled from Ray and the registry.
JOBS = Metric(
    "aiaas_jobs",
    "gauge",
    "Ray jobs of this cluster by aiaas kind (train, tune, finetune, optimize, other) and status.",
    ("kind", "status"),
)
SERVE_REPLICAS = Metric(
    "aiaas_serve_replicas",
    "gauge",
    "Serve replicas by application, deployment and state.",
    ("application", "deployment", "state"),
)
SERVE_REPLICAS_MAX = Metric(
    "aiaas_serve_replicas_max",
    "gauge",
    "The most replicas a deployment may have (autoscaling max, or its fixed count).",
    ("application", "deployment"),
)
REGISTRY_VERSIONS = Metric(
    "aiaas_registry_versions",
    "gauge",
    "Registered versions by model and state (ready, incomplete).",
    ("model", "state"),
)
REGISTRY_ALIAS_MOVES = Metric(
    "aiaas_registry_alias_moves",
    "gauge",
    "Alias moves recorded in the registry, by model, alias and action (promote, rollback, ...).",
    ("model", "alias", "action"),
)
EXPORTER_ERRORS = Metric(
    "aiaas_exporter_errors",
    "counter",
    "Polls of the cluster exporter that failed, by source (jobs, serve, registry).",
    ("source",),
)

CATALOGUE: tuple[Metric, ...] = tuple(
    value for value in list(globals().values()) if isinstance(value, Metric)
)
