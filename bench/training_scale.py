"""A training job's fixed start-up cost, and how training scales with the data set.

Start-up: ``aiaas train`` of a 10k-row table (1 worker, 2 epochs), from the command's start to
the first training step, and from the last step to the version registered, against Ray Train's
own ``TorchTrainer.fit()`` start-up (fit() called → first step of a 1-worker trainer, driver
already connected). The job log's phase marks say where aiaas's seconds go.

Scaling: the same job on generated tables of 10k, 100k and 1M rows: samples/s of the last
epoch (it must stay flat), and the peak memory (RSS) of the driver and the worker.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from aiaas import progress
from bench import report, serving
from tests import support

SIZES = {"10k": 10_000, "100k": 100_000, "1m": 1_000_000}

_FIT_STARTUP = r"""
import json, logging, os, sys, time
import ray, ray.train
from ray.train.torch import TorchTrainer

ray.init(address=sys.argv[1], logging_level=logging.ERROR)
mark = os.path.join(sys.argv[2], f"first-step-{time.time_ns()}")
os.makedirs(sys.argv[2], exist_ok=True)

def loop(config):
    import time
    with open(config["mark"], "w") as out:
        out.write(str(time.time()))

called = time.time()
TorchTrainer(
    loop,
    train_loop_config={"mark": mark},
    scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
    run_config=ray.train.RunConfig(storage_path=sys.argv[2], name=f"fit-{time.time_ns()}"),
).fit()
print(json.dumps({"startup_s": float(open(mark).read()) - called}))
"""


def _cluster(directory: Path) -> Path:
    env = yaml.safe_load((support.REPO / "configs/cluster/local.yaml").read_text())["env"]
    return support.write_cluster_config(
        directory,
        "bench-scale",
        workers=0,
        # Room for a 1M-row table (Ray Data reads it into the object store once).
        head={"num_cpus": 2, "memory": "8GiB", "object_store_memory": "2GiB"},
        env={k: str(v) for k, v in env.items()},
    )


def _prepare(config: Path, directory: Path, name: str, rows: int) -> None:
    path = directory / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "kind": "dataset",
                "name": name,
                "source": {"type": "generated", "rows": rows, "features": 32, "classes": 4},
                "seed": 0,
            }
        )
    )
    result = support.run(
        "aiaas", "data", "prepare", str(path), "--cluster", str(config), timeout=900
    )
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-2000:])


def _train(config: Path, directory: Path, dataset: str, run: str) -> dict[str, Any]:
    """One ``aiaas train --follow``; its phase marks, epochs and figures."""
    path = directory / f"{run}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "kind": "train",
                "name": run,
                "dataset": dataset,
                "model": {"name": "mlp", "hidden_sizes": [128, 64]},
                "optimizer": {"name": "adam", "lr": 0.003},
                "epochs": 2,
                "batch_size": 256,
                "scaling": {"num_workers": 1, "resources_per_worker": {"CPU": 1}},
                "checkpoint": {"num_to_keep": 1, "score_metric": "val_accuracy"},
                "registration": {"model_name": run, "gate": {"accuracy": ">= 0"}},
            }
        )
    )
    submitted = time.time()
    result = support.run(
        "aiaas", "train", str(path), "--follow", "--cluster", str(config), timeout=1800
    )
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-2000:])
    job = result.stdout.split("Submitted ", 1)[1].split()[0]
    log = support.run("aiaas", "jobs", "logs", job, "--cluster", str(config)).stdout
    phases: dict[str, dict[str, Any]] = {}
    epochs: list[dict[str, Any]] = []
    for event in progress.events(log.splitlines()):
        if "phase" in event:
            phases.setdefault(event["phase"], event)
        elif "epoch_s" in event:
            epochs.append(event)
    last_epoch_end = phases["fit_done"]["at"]
    return {
        "submit_to_first_step_s": phases["first_step"]["at"] - submitted,
        "submit_to_driver_s": phases["driver_started"]["at"] - submitted,
        "driver_to_fit_s": phases["fit_started"]["at"] - phases["driver_started"]["at"],
        "fit_to_first_step_s": phases["first_step"]["at"] - phases["fit_started"]["at"],
        "last_step_to_registered_s": phases["registered"]["at"] - last_epoch_end,
        "samples_per_s": epochs[-1]["samples_per_s"],
        "worker_peak_rss_mb": max(e["peak_rss_mb"] for e in epochs),
        "driver_peak_rss_mb": phases["registered"]["peak_rss_mb"],
    }


def _fit_startup(gcs: str, storage: str, config: Path) -> float:
    result = subprocess.run(
        [sys.executable, "-c", _FIT_STARTUP, gcs, storage],
        env=support.env(support.cluster_ray_env(config)),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return float(json.loads(result.stdout.strip().splitlines()[-1])["startup_s"])


def run() -> list[dict[str, Any]]:
    directory = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    config = _cluster(directory)
    data = yaml.safe_load(config.read_text())
    gcs = f"127.0.0.1:{data['ports']['gcs']}"
    storage = str(Path(data["storage_root"]) / "fit-reference")
    startup: list[dict[str, Any]] = []
    fits: list[float] = []
    scale: dict[str, dict[str, Any]] = {}
    try:
        support.run("aiaas", "cluster", "up", str(config), timeout=600).check_returncode()
        for label, count in SIZES.items():
            _prepare(config, directory, f"scale-{label}", count)
        for round_number in range(serving.ROUNDS):
            steps = ["aiaas", "fit"] if round_number % 2 == 0 else ["fit", "aiaas"]
            for step in steps:
                if step == "fit":
                    fits.append(_fit_startup(gcs, storage, config))
                    print(f"  fit() start-up: {fits[-1]:.2f} s", flush=True)
                else:
                    startup.append(_train(config, directory, "scale-10k", f"start-{round_number}"))
                    print(f"  aiaas 10k: {startup[-1]}", flush=True)
        scale["10k"] = startup[-1]
        for label in ("100k", "1m"):
            scale[label] = _train(config, directory, f"scale-{label}", f"scale-{label}")
            print(f"  aiaas {label}: {scale[label]}", flush=True)
    finally:
        support.run("aiaas", "cluster", "down", str(config), timeout=300)
        shutil.rmtree(directory, ignore_errors=True)

    def med(key: str) -> float:
        return report.median([run[key] for run in startup])

    fit = report.median(fits)
    rows = [
        serving._row(
            "start-up: submit → first step (1 worker)",
            med("submit_to_first_step_s"),
            fit,
            "Ray Train fit() → first step, driver connected",
            "s",
            0.3,
        ),
        serving._row(
            "  of which: submit → driver running (Ray Jobs)",
            med("submit_to_driver_s"),
            fit,
            "Ray Train fit() → first step",
            "s",
            None,
        ),
        serving._row(
            "  of which: driver → fit() (checks, data set read)",
            med("driver_to_fit_s"),
            fit,
            "Ray Train fit() → first step",
            "s",
            None,
        ),
        serving._row(
            "  of which: fit() → first step (worker group)",
            med("fit_to_first_step_s"),
            fit,
            "Ray Train fit() → first step",
            "s",
            None,
        ),
        serving._row(
            "wrap-up: last step → version registered",
            med("last_step_to_registered_s"),
            fit,
            "Ray Train fit() → first step",
            "s",
            None,
        ),
    ]
    # An epoch of 8k rows takes ~50 ms: the median of the three 10k runs is the base.
    base = med("samples_per_s")
    for label in ("100k", "1m"):
        rows.append(
            serving._row(
                f"throughput at {label} rows vs 10k",
                scale[label]["samples_per_s"],
                base,
                "the same job at 10k rows",
                "samples/s",
                0.8,
                higher=True,
            )
        )
    for label in SIZES:
        for who in ("driver", "worker"):
            rows.append(
                serving._row(
                    f"peak memory, {who}, {label} rows",
                    scale[label][f"{who}_peak_rss_mb"],
                    scale["10k"][f"{who}_peak_rss_mb"],
                    f"{who} at 10k rows",
                    "MB",
                    None,
                )
            )
    return rows
