"""The plain FastAPI app the serving benchmark compares against: the same registered version,
the same JSON in and out, the same parsing — no Ray, no batching, one uvicorn worker.

``uvicorn bench.reference_app:app`` with ``BENCH_MODEL=NAME:VERSION`` and MLFLOW_TRACKING_URI;
with ``BENCH_EMBEDDER=NAME:VERSION`` instead, OpenAI's ``POST /v1/embeddings`` for a registered
sentence-transformers version: the same token count and encode per request as the embeddings
app, one request at a time.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from fastapi import FastAPI, Request

from aiaas import artifacts, registry


def predict_body(predictor: Any, version: str, body: bytes) -> dict[str, Any]:
    """What every target of the benchmark does with a request: parse, check, predict."""
    rows = np.asarray(json.loads(body)["instances"], dtype=np.float32)
    rows = rows.reshape(len(rows), -1)
    if not np.isfinite(rows).all():
        raise ValueError("not finite")
    classes = predictor.predict(rows).argmax(axis=1).tolist()
    return {"predictions": classes, "model": "digits", "version": version}


def embeddings_body(embedder: Any, name: str, version: str, body: bytes) -> dict[str, Any]:
    payload = json.loads(body)
    texts = payload["input"] if isinstance(payload["input"], list) else [payload["input"]]
    tokens = sum(min(n, embedder.max_tokens) for n in embedder.token_counts(texts))
    vectors = embedder.encode(texts)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": vector.tolist()}
            for i, vector in enumerate(vectors)
        ],
        "model": name,
        "version": version,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _build() -> FastAPI:
    app = FastAPI()
    embedder_ref = os.environ.get("BENCH_EMBEDDER")
    if embedder_ref:
        found = registry.resolve(registry.parse_ref(embedder_ref))
        embedder = artifacts.load_embedder(found, threads=1)

        @app.post("/v1/embeddings")
        async def embed(request: Request) -> dict[str, Any]:
            return embeddings_body(
                embedder, "all-MiniLM-L6-v2", found.version, await request.body()
            )

        return app
    reference = os.environ.get("BENCH_MODEL")
    if not reference:
        return app  # imported for its helpers, not served
    version = registry.resolve(registry.parse_ref(reference))
    predictor = artifacts.load(version)

    @app.post("/v1/models/digits:predict")
    async def predict(request: Request) -> dict[str, Any]:
        return predict_body(predictor, version.version, await request.body())

    return app


app = _build()
