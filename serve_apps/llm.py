"""Generative LLMs behind OpenAI's chat and completions API on Ray Serve.

``import_path: serve_apps.llm:build_app`` with ``route_prefix: /v1``:

- ``POST /v1/chat/completions`` and ``POST /v1/completions`` in OpenAI's shapes, whole or
  streamed (``stream: true``: server-sent events, ``data: [DONE]``, usage in a last chunk with
  ``stream_options.include_usage``)
- ``GET /v1/models`` → every model of every OpenAI-style app on the cluster (when the model
  server is deployed, ``/v1/models`` is its route and it answers the same list)
- ``GET /v1/llm/{model}`` → readiness, the version served, and the engine's load

LoRA adapters (entries with ``adapter_of``) are served by their base model's engine on the same
replicas, chosen by the request's ``model``: an adapter version is read and checked when it is
pinned, copied into the engine's adapter table on first use (:mod:`aiaas.multi_lora`: requests
of different adapters and of the base share one batch), and kept in a bounded per-replica cache
(Ray Serve's model multiplexing: least recently used go first, and a request with the
``serve_multiplexed_model_id`` header naming the adapter is routed to a replica holding it).

Each replica runs one continuous-batching engine per served version
(:mod:`aiaas.llm_engine`): requests join the running batch at the next decoding step. Versions
are pinned and switched in place as in the other apps; a stream that started on the old version
finishes on it, and the old engine stops once its last stream ends. ``engine: vllm`` builds Ray
Serve LLM's OpenAI app instead (:mod:`aiaas.serving.vllm_engine`).
"""

# No `from __future__ import annotations`: Serve reads build_app's annotation to build Args.

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve

from aiaas import (
    adapters,
    api_keys,
    causal_lm,
    errors,
    llm_engine,
    llm_text,
    multi_lora,
    openai_models,
    registry,
    serve_http,
)
from aiaas import metrics as aiaas_metrics
from aiaas import openai_protocol as protocol
from aiaas.serving import apps as serving_apps

logger = logging.getLogger("ray.serve")

#: The app's arguments (the ``args:`` of its entry in a Serve config file), owned by the library.
Args = serving_apps.LLMArgs
RETIRE_GRACE_S = 2.0
#: Adapter slots beyond the cache's size: evicted adapters whose streams still run hold theirs.
SPARE_ADAPTER_SLOTS = 4


@dataclass
class Loaded:
    """A version loaded in this replica: its engine and the streams still running on it."""

    version: str
    engine: llm_engine.Engine
    created: int
    context: int
    streams: int = 0


@dataclass
class AdapterVersion:
    """An adapter version pinned in this replica: read and checked; in the engine on first use."""

    version: str
    created: int
    weights: multi_lora.AdapterWeights
    parent: str  # the base version it was trained on


@dataclass
class Tally:
    """One generation's token counts, kept up to date while it runs."""

    prompt_tokens: int
    output_tokens: int = 0

    def usage(self) -> dict[str, int]:
        return protocol.usage(self.prompt_tokens, self.output_tokens)


app = FastAPI(title="aiaas LLM", docs_url=None, redoc_url=None)
serve_http.install_error_handlers(app)


@serve.deployment(name=serving_apps.LLM.deployment, max_ongoing_requests=64)
@serve.ingress(app)
class LLMServer:
    """Serves the causal LMs of :class:`Args` with OpenAI's API."""

    def __init__(self, args: Args) -> None:
        import torch

        self.args = args
        torch.set_num_threads(args.threads)
        self.adapter_bases = {m.name: m.adapter_of for m in args.models if m.adapter_of}
        self.slots = serve_http.Slots(args.models, self._load, serve_http.replica_user_config())
        for name, base in self.adapter_bases.items():  # a base loaded after its adapter
            self._check_fits(self.slots.loaded[name], self.slots.loaded[base])

        # Ray Serve's model multiplexing owns the per-replica adapter cache (LRU, metrics, and
        # routing by the serve_multiplexed_model_id header); what it caches is a holder.
        async def new_holder(name: str) -> multi_lora.Holder:
            return multi_lora.Holder()

        # A function of its own: Serve keeps its cache on the function object.
        self.adapter_holder = serve.multiplexed(
            max_num_models_per_replica=args.max_adapters_per_replica
        )(new_holder)
        self.keys = api_keys.replica_ring(args.api_keys_file)
        self.catalogue = openai_models.Catalogue()
        self.retiring: set[asyncio.Task[None]] = set()
        self.requests = aiaas_metrics.LLM_REQUESTS.create(serve=True)
        self.ttft = aiaas_metrics.LLM_TTFT.create(serve=True)
        self.inter_token = aiaas_metrics.LLM_INTER_TOKEN.create(serve=True)
        self.prompt_tokens = aiaas_metrics.LLM_PROMPT_TOKENS.create(serve=True)
        self.output_tokens = aiaas_metrics.LLM_OUTPUT_TOKENS.create(serve=True)
        self.running = aiaas_metrics.LLM_RUNNING.create(serve=True)
        self.waiting = aiaas_metrics.LLM_WAITING.create(serve=True)

    def _load(self, version: registry.Version) -> Loaded | AdapterVersion:
        if version.format == adapters.FORMAT:
            return self._read_adapter(version)
        directory = causal_lm.local_directory(version)
        limits = llm_engine.Limits(
            self.args.max_running,
            self.args.max_queued,
            self.args.kv_cache_tokens,
            self.args.prefill_chunk_tokens,
        )
        table = None
        if self.args.serves_adapters:
            table = multi_lora.TableSize(
                self.args.max_adapters_per_replica + SPARE_ADAPTER_SLOTS,
                self.args.max_adapter_rank,
                tuple(self.args.adapter_targets),
            )
        device = "cuda" if self.args.use_gpu else "cpu"
        engine = llm_engine.Engine(directory, limits, device, table)
        seconds = engine.warm_up()
        logger.info("%s:%s ready (warm-up %.1fs)", version.name, version.version, seconds)
        context = min(engine.context_length, self.args.max_context_tokens or 1 << 30)
        return Loaded(version.version, engine, int(version.created), context)

    def _read_adapter(self, version: registry.Version) -> AdapterVersion:
        """An adapter version's files, read and checked against its base when that is loaded
        (a version that does not fit fails here, and the last good one keeps serving)."""
        directory = adapters.local_directory(version)
        try:
            weights = multi_lora.read(directory)
        except multi_lora.AdapterProblem as exc:
            raise errors.ConfigError(
                f"{version.name}:{version.version}: {exc}", "Serve a plain LoRA adapter."
            ) from None
        parent = version.lineage.get("parent") or adapters.trained_on(directory)
        adapter = AdapterVersion(version.version, int(version.created), weights, parent)
        slots = getattr(self, "slots", None)
        if slots is not None:
            for name, base in self.adapter_bases.items():
                if slots.entries[name].name == version.name and base in slots.loaded:
                    self._check_fits(adapter, slots.loaded[base])
        return adapter

    @staticmethod
    def _check_fits(adapter: Any, base: Any) -> None:
        if base.engine.adapters is None:
            return
        try:
            base.engine.adapters.check(adapter.weights)
        except multi_lora.AdapterProblem as exc:
            raise errors.ConfigError(
                f"the adapter version {adapter.version} does not fit its base model: {exc}",
                "Serve it beside the base model it was trained on.",
            ) from None

    def _resolved(self, name: str) -> tuple[Loaded, AdapterVersion | None]:
        """What answers ``name``: the engine, and for an adapter its version (404 for a name
        this app does not serve)."""
        found = self.slots.get(name)
        if isinstance(found, Loaded):
            return found, None
        base = self.slots.get(self.adapter_bases[name])
        assert isinstance(base, Loaded)
        return base, found

    async def _lease(self, name: str, base: Loaded, adapter: AdapterVersion) -> multi_lora.Lease:
        """A lease of the adapter's slot in the base engine (installed there on first use)."""
        table = base.engine.adapters
        assert table is not None
        holder = await self.adapter_holder(name)
        # No await between the holder and its lease: the cache cannot evict it in between.
        try:
            return holder.lease(table, adapter.weights, (adapter.version, id(base)))
        except multi_lora.NoFreeSlot:
            raise serve_http.ApiError(
                503, "adapters_busy", "every adapter slot of this replica is in use; retry"
            ) from None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Switch to pinned versions; a replaced engine stops after its last stream."""
        before = dict(self.slots.loaded)
        await self.slots.apply(user_config)
        for name, old in before.items():
            if isinstance(old, Loaded) and self.slots.loaded.get(name) is not old:
                task = asyncio.get_running_loop().create_task(self._retire(old))
                self.retiring.add(task)
                task.add_done_callback(self.retiring.discard)

    async def _retire(self, old: Loaded) -> None:
        # A request that chose the old version just before the swap starts its generation a
        # moment later (a stream, when its response starts): give it that moment first.
        await asyncio.sleep(RETIRE_GRACE_S)
        deadline = time.monotonic() + self.args.request_timeout_s
        while old.streams > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.to_thread(old.engine.close)
        logger.info("version %s retired", old.version)

    def check_health(self) -> None:
        """Serve's health check: a dead engine loop makes the replica unhealthy (restarted)."""
        for name, loaded in self.slots.loaded.items():
            if isinstance(loaded, Loaded) and not loaded.engine.alive:
                raise RuntimeError(f"the engine of {name}:{loaded.version} stopped")

    async def _authorize(self, request: Request, status: bool = False) -> str | None:
        if self.keys is None:
            return None
        return await self.keys.admit(request.headers.get("authorization"), status)

    def openai_models(self) -> list[dict[str, Any]]:
        """This app's models in OpenAI's shape (what ``GET /v1/models`` of any app lists)."""
        found = []
        for name, loaded in self.slots.loaded.items():
            base = self.slots.loaded.get(self.adapter_bases.get(name, name))
            entry = {
                "id": name,
                "object": "model",
                "created": loaded.created,
                "owned_by": "aiaas",
                "version": loaded.version,
                "kind": "chat",
                "context_length": base.context if isinstance(base, Loaded) else None,
            }
            if isinstance(loaded, AdapterVersion):
                entry["parent"] = self.adapter_bases[name]
            found.append(entry)
        return found

    @app.get("/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        await self._authorize(request, status=True)
        data = await self.catalogue.models(self.openai_models(), serving_apps.LLM.deployment)
        return {"object": "list", "data": data}

    @app.get("/llm/{name}")
    async def model_status(self, name: str, request: Request) -> dict[str, Any]:
        await self._authorize(request, status=True)
        found = self.slots.get(name)
        base = found
        if isinstance(found, AdapterVersion):
            base = self.slots.get(self.adapter_bases[name])
        assert isinstance(base, Loaded)
        status: dict[str, Any] = {
            "name": name,
            "model": str(self.slots.entries[name]),
            "ready": base.engine.alive,
            "version": found.version,
            "format": causal_lm.FORMAT,
            "context_length": base.context,
            "running": base.engine.running,
            "waiting": base.engine.waiting,
        }
        if isinstance(found, AdapterVersion):
            status.update(
                format=adapters.FORMAT,
                adapter_of=self.adapter_bases[name],
                base_version=base.version,
                trained_on=found.parent,
                adapter=multi_lora.describe(found.weights),
            )
        if name in self.slots.failed:
            status["failed_version"] = self.slots.failed[name]
        return status

    @app.post("/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        return await self._serve(request, "chat")

    @app.post("/completions")
    async def completions(self, request: Request) -> Any:
        return await self._serve(request, "completions")

    async def _serve(self, request: Request, kind: str) -> Any:
        """Check the request, then answer it whole or as a stream; every refusal is a 4xx/5xx
        in OpenAI's error shape, counted by model, version and code."""
        arrived = time.perf_counter()
        name, version, code = "?", "?", "200"
        try:
            key = await self._authorize(request)
            if self.keys is not None and key:
                await self.keys.admit_tokens(key)
            try:
                async with asyncio.timeout(self.args.request_timeout_s):
                    body = await serve_http.json_body(request, self.args.max_payload_bytes)
            except TimeoutError:
                raise serve_http.body_timeout(self.args.request_timeout_s) from None
            model = protocol.ChatRequest if kind == "chat" else protocol.CompletionRequest
            parsed = protocol.parse(model, body)
            loaded, adapter = self._resolved(parsed.model)
            name, version = parsed.model, (adapter or loaded).version
            prompt, sampling, stops = self._prepared(parsed, kind, loaded)
            if not loaded.engine.alive:
                raise serve_http.ApiError(503, "engine_stopped", "the model's engine stopped")
            if loaded.engine.admitted >= self.args.max_running + self.args.max_queued:
                raise serve_http.ApiError(
                    503, "overloaded", "the model is overloaded; retry shortly"
                )
            request_id = protocol.completion_id(kind)
            tally = Tally(len(prompt))
            lease = None if adapter is None else await self._lease(name, loaded, adapter)
            generation = self._generate(
                loaded, name, version, prompt, sampling, stops, arrived, key, tally, lease
            )
            if parsed.stream:
                events = self._events(generation, tally, kind, request_id, name, version, parsed)
                return StreamingResponse(
                    events,
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            text, finish = await self._whole(generation)
            return protocol.response(kind, request_id, name, version, text, finish, tally.usage())
        except (serve_http.ApiError, api_keys.Denied) as exc:
            code = str(exc.status)
            raise
        except TimeoutError:
            code = "504"
            raise serve_http.answer_timeout(self.args.request_timeout_s) from None
        finally:
            tags = {"model": name, "version": version, "endpoint": kind, "code": code}
            self.requests.inc(tags=tags)

    def _prepared(
        self, parsed: Any, kind: str, loaded: Loaded
    ) -> tuple[list[int], llm_engine.Sampling, tuple[str, ...]]:
        stops = parsed.stops()
        engine = loaded.engine
        if kind == "chat":
            prompt = engine.chat_prompt(parsed.chat())
        else:
            prompt = engine.text_prompt(parsed.text())
        limit = parsed.output_limit()
        room = loaded.context - len(prompt)
        if room < 1:
            raise serve_http.ApiError(
                400,
                "context_length_exceeded",
                f"the prompt has {len(prompt)} tokens; {parsed.model} takes at most "
                f"{loaded.context} tokens of prompt and output together",
                "messages" if kind == "chat" else "prompt",
            )
        if limit is not None and limit > room:
            field = (
                "max_completion_tokens"
                if getattr(parsed, "max_completion_tokens", None)
                else "max_tokens"
            )
            raise serve_http.ApiError(
                400,
                "context_length_exceeded",
                f"the prompt has {len(prompt)} tokens and {field} is {limit}: more than the "
                f"{loaded.context} tokens {parsed.model} takes; ask for at most {room}",
                field,
            )
        wanted = limit if limit is not None else min(self.args.default_max_tokens, room)
        sampling = llm_engine.Sampling(wanted, parsed.temperature, parsed.top_p, parsed.seed)
        return prompt, sampling, stops

    async def _generate(
        self,
        loaded: Loaded,
        name: str,
        version: str,
        prompt: list[int],
        sampling: llm_engine.Sampling,
        stops: tuple[str, ...],
        arrived: float,
        key: str | None,
        tally: Tally,
        lease: multi_lora.Lease | None,
    ) -> AsyncGenerator[tuple[str, str | None]]:
        """Yield ``(text, finish_reason)`` as text is ready (``tally`` counting the tokens); the
        last item carries the finish reason. Closing it early (a client gone) cancels the
        engine's request; the adapter's ``lease`` ends with it."""
        tags = {"model": name, "version": version}
        engine = loaded.engine
        text = llm_text.TextStream(engine.tokenizer, stops)
        produced, first, last = 0, 0.0, 0.0
        finish = "length"
        loaded.streams += 1
        self.prompt_tokens.inc(len(prompt), tags=tags)
        self._gauges(loaded, tags)
        deadline = arrived + self.args.request_timeout_s
        tokens = engine.generate(prompt, sampling, None if lease is None else lease.slot)
        try:
            while True:
                # A deadline per step, not a timeout around the loop: this generator yields
                # to the response between steps, and a timeout would fire there instead.
                remaining = deadline - time.perf_counter()
                try:
                    new = await asyncio.wait_for(anext(tokens), max(remaining, 0.001))
                except StopAsyncIteration:
                    break
                now = time.perf_counter()
                if not produced:
                    first = now
                    self.ttft.observe((now - arrived) * 1000, tags=tags)
                    self._gauges(loaded, tags)
                produced += len(new)
                tally.output_tokens = produced
                last = now
                if new[-1] in engine.eos_ids:
                    finish = "stop"
                piece = text.feed(new)
                if text.stopped:
                    finish = "stop"
                    yield piece, None
                    break
                if piece:
                    yield piece, None
            yield text.flush(), finish
        except llm_engine.Overloaded:
            raise serve_http.ApiError(
                503, "overloaded", "the model is overloaded; retry shortly"
            ) from None
        except llm_engine.EngineFailed as exc:
            raise serve_http.ApiError(
                503, "generation_failed", f"generation failed: {exc}"
            ) from None
        finally:
            await tokens.aclose()
            if lease is not None:
                lease.close()
            loaded.streams -= 1
            if produced:
                self.output_tokens.inc(produced, tags=tags)
            if produced > 1:
                self.inter_token.observe((last - first) * 1000 / (produced - 1), tags=tags)
            self._gauges(loaded, tags)
            if self.keys is not None and key:
                await self.keys.charge_tokens(key, len(prompt) + produced)

    def _gauges(self, loaded: Loaded, tags: dict[str, str]) -> None:
        self.running.set(loaded.engine.running, tags=tags)
        self.waiting.set(loaded.engine.waiting, tags=tags)

    @staticmethod
    async def _whole(generation: AsyncIterator[tuple[str, str | None]]) -> tuple[str, str]:
        parts: list[str] = []
        finish = "length"
        async for piece, ended in generation:
            parts.append(piece)
            finish = ended or finish
        return "".join(parts), finish

    async def _events(
        self,
        generation: AsyncGenerator[tuple[str, str | None]],
        tally: Tally,
        kind: str,
        request_id: str,
        name: str,
        version: str,
        parsed: Any,
    ) -> AsyncIterator[str]:
        """Server-sent events of one stream. An error after the stream began cannot change the
        status code any more: it is sent as an ``error`` event before ``[DONE]``."""
        created = int(time.time())
        include_usage = parsed.include_usage()

        def event(payload: dict[str, Any]) -> str:
            return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

        def chunk(text: str | None, finish: str | None = None, role: bool = False) -> str:
            return event(
                protocol.chunk(
                    kind,
                    request_id,
                    name,
                    version,
                    created,
                    text,
                    finish,
                    role,
                    include_usage=include_usage,
                )
            )

        try:
            if kind == "chat":
                yield chunk("", role=True)
            async for piece, finish in generation:
                if piece or finish:
                    yield chunk(piece, finish)
            if include_usage:
                yield event(
                    protocol.chunk(
                        kind,
                        request_id,
                        name,
                        version,
                        created,
                        None,
                        counts=tally.usage(),
                        include_usage=True,
                    )
                )
        except serve_http.ApiError as exc:
            yield event(
                {"error": {"code": exc.code, "message": exc.message, "type": "server_error"}}
            )
        except TimeoutError:
            yield event(
                {
                    "error": {
                        "code": "timeout",
                        "message": "the stream ran past the request timeout",
                        "type": "server_error",
                    }
                }
            )
        finally:
            await generation.aclose()
        yield "data: [DONE]\n\n"


def build_app(args: Args) -> serve.Application:
    """The Serve application for ``args`` (what ``import_path`` names)."""
    if args.engine == "vllm":
        from aiaas.serving import vllm_engine

        # Resolved once, when the app is built: Ray Serve LLM's replicas take a fixed source,
        # so a promotion reaches a vLLM app by deploying it again (aiaas models promote does).
        versions = {m.name: registry.resolve(registry.parse_ref(m.model)) for m in args.models}
        return vllm_engine.build_app(args, versions)
    return LLMServer.bind(args)  # type: ignore[attr-defined]
