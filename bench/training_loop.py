"""Training loop overhead and checkpoint cost.

The same MLP (128-64), data (the generated 100k-row table: 32 features, 4 classes), batch size
and epochs in (a) a plain PyTorch loop in one process, (b) aiaas / Ray Train with 1 worker,
(c) plain ``torch.distributed`` (gloo) with 2 processes, (d) aiaas with 2 workers. Loop time is
the epochs' own time — training, validation and, for aiaas, ``ray.train.report`` with its
checkpoint — not start-up. Checkpoint cost: aiaas's per-epoch report with a checkpoint vs a raw
``torch.save`` of the same state. Median of 3 alternating rounds.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from aiaas import progress
from bench import report, serving
from tests import support

EPOCHS = 3
BATCH = 64
DATASET = "generated-100k"


def _plain(rank: int, world: int, port: int, root: str, results: Any) -> None:
    """One process of the plain loop (world 1: single process; world 2: DDP over gloo)."""
    import numpy as np
    import pandas as pd
    import torch
    from torch import nn

    from aiaas import models
    from aiaas.config.train import ModelSpec

    torch.set_num_threads(1)
    torch.manual_seed(0)
    frames = {
        split: pd.read_parquet(Path(root) / "datasets" / DATASET / split)
        for split in ("train", "validation")
    }
    features = [c for c in frames["train"].columns if c != "label"]
    x = torch.from_numpy(frames["train"][features].to_numpy(np.float32))[rank::world]
    y = torch.from_numpy(frames["train"]["label"].to_numpy()).long()[rank::world]
    xv = torch.from_numpy(frames["validation"][features].to_numpy(np.float32))[rank::world]
    yv = torch.from_numpy(frames["validation"]["label"].to_numpy()).long()[rank::world]
    model: nn.Module = models.build(ModelSpec(name="mlp", hidden_sizes=[128, 64]), 32, 4, None)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.003)
    loss_fn = nn.CrossEntropyLoss()
    loop = saves = 0.0
    for epoch in range(EPOCHS):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for start in range(0, len(x), BATCH):
            index = order[start : start + BATCH]
            optimizer.zero_grad()
            loss_fn(model(x[index]), y[index]).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():  # validation loss and accuracy, as the aiaas loop computes
            for start in range(0, len(xv), 1024):
                logits = model(xv[start : start + 1024])
                loss_fn(logits, yv[start : start + 1024])
                (logits.argmax(1) == yv[start : start + 1024]).sum()
        loop += time.perf_counter() - started
        if rank == 0:
            saved = time.perf_counter()
            with tempfile.TemporaryDirectory() as directory:
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
                torch.save(state, Path(directory) / "state.pt")
            saves += time.perf_counter() - saved
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank == 0:
        results.put({"loop_s": loop, "save_s": saves / EPOCHS})


def _run_plain(world: int, root: str) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = support.free_ports(1)[0]
    processes = [
        context.Process(target=_plain, args=(rank, world, port, root, results))
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    found: dict[str, float] = results.get(timeout=900)
    for process in processes:
        process.join(timeout=60)
    return found


def _run_aiaas(bench: serving.Bench, directory: Path, workers: int) -> dict[str, float]:
    config = {
        "kind": "train",
        "name": f"bench-loop-{workers}-{uuid.uuid4().hex[:6]}",
        "dataset": DATASET,
        "model": {"name": "mlp", "hidden_sizes": [128, 64], "dropout": 0.1},
        "optimizer": {"name": "adam", "lr": 0.003},
        "epochs": EPOCHS,
        "batch_size": BATCH,
        "scaling": {"num_workers": workers, "resources_per_worker": {"CPU": 1}},
        "checkpoint": {"num_to_keep": 1, "score_metric": "val_accuracy"},
    }
    path = directory / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config))
    result = support.run(
        "aiaas", "train", str(path), "--follow", "--cluster", str(bench.config), timeout=1200
    )
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-2000:])
    job = result.stdout.split("Submitted ", 1)[1].split()[0]
    log = support.run("aiaas", "jobs", "logs", job, "--cluster", str(bench.config)).stdout
    epochs: dict[int, dict[str, float]] = {}
    for event in progress.events(log.splitlines()):
        if "epoch_s" in event:
            epochs[int(event["epoch"])] = event
    if len(epochs) != EPOCHS:
        raise RuntimeError(f"expected {EPOCHS} epochs in the log of {job}, got {len(epochs)}")
    # Each epoch reports the time of the previous report: epochs 2..N carry reports 1..N-1.
    reports = [epochs[e]["previous_report_s"] for e in range(1, EPOCHS)]
    loop = sum(e["epoch_s"] for e in epochs.values()) + statistics.mean(reports) * EPOCHS
    return {"loop_s": loop, "report_s": statistics.mean(reports)}


def run() -> list[dict[str, Any]]:
    directory = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    env = yaml.safe_load((support.REPO / "configs/cluster/local.yaml").read_text())["env"]
    bench = serving.Bench(directory, "bench-loop", {k: str(v) for k, v in env.items()})
    root = yaml.safe_load(bench.config.read_text())["storage_root"]
    found: dict[str, list[dict[str, float]]] = {}
    try:
        bench.running = True  # set first: stop() then takes down a cluster that half started
        support.run("aiaas", "cluster", "up", str(bench.config), timeout=600).check_returncode()
        support.run(
            "aiaas",
            "data",
            "prepare",
            "configs/data/generated_100k.yaml",
            "--cluster",
            str(bench.config),
            timeout=600,
        ).check_returncode()
        steps = ["plain-1", "aiaas-1", "plain-2", "aiaas-2"]
        for round_number in range(serving.ROUNDS):
            for step in steps if round_number % 2 == 0 else steps[::-1]:
                kind, workers = step.split("-")
                measured = (
                    _run_plain(int(workers), root)
                    if kind == "plain"
                    else _run_aiaas(bench, directory, int(workers))
                )
                print(f"  {step}: {measured}", flush=True)
                found.setdefault(step, []).append(measured)
    finally:
        bench.stop()
        shutil.rmtree(directory, ignore_errors=True)

    def med(step: str, key: str) -> float:
        return report.median([row[key] for row in found[step]])

    return [
        serving._row(
            "loop time, 1 worker",
            med("aiaas-1", "loop_s"),
            med("plain-1", "loop_s"),
            "plain PyTorch loop, 1 process",
            "s",
            1.05,
        ),
        serving._row(
            "loop time, 2 workers",
            med("aiaas-2", "loop_s"),
            med("plain-2", "loop_s"),
            "torch.distributed (gloo), 2 processes",
            "s",
            1.05,
        ),
        serving._row(
            "checkpoint: report() with checkpoint per epoch",
            med("aiaas-1", "report_s"),
            med("plain-1", "save_s"),
            "torch.save of the same state",
            "s",
            2.0,
        ),
    ]
