"""The plain FastAPI app the serving benchmark compares against: the same registered version,
the same JSON in and out, the same parsing — no Ray, no batching, one uvicorn worker.

``uvicorn bench.reference_app:app`` with ``BENCH_MODEL=NAME:VERSION`` and MLFLOW_TRACKING_URI.
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


def _build() -> FastAPI:
    app = FastAPI()
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
