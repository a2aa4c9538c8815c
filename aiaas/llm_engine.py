"""One replica's generation engine for a causal LM version: transformers' continuous batching.

transformers 5.x ships an iteration-level scheduler with a paged KV cache
(``generation/continuous_batching``, what ``transformers serve`` runs): a request added while
others generate joins the running batch at the next decoding step, and per-request temperature
and top-p are applied by its per-request logits processors. This module only adapts it to
asyncio — a request is an async iterator of new token ids — and adds what a service needs and the
engine does not do: admission limits (running + queued → 503), cancellation that also drops the
result handler (a cancelled request delivers nothing more), and counts for the metrics.

Sampling is ours (:mod:`aiaas.llm_sampling`): the engine runs greedy, and one processor samples
only the rows that ask for it, each from its own seeded random stream. So are LoRA adapters
(:mod:`aiaas.multi_lora`): with a table, each request may name an adapter slot, and the tokens
of one step take their own request's adapter.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import math
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiaas import multi_lora

logger = logging.getLogger("ray.serve")

#: torch generators take seeds below 2^64; OpenAI's are any integer.
SEEDS = 2**63
PAGE_TOKENS = 256


class Overloaded(Exception):
    """Every running and queued place of the engine is taken (503)."""


class EngineFailed(Exception):
    """The engine failed a request (its message says why), or its loop died."""


@dataclass(frozen=True)
class Sampling:
    """How one request samples."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class Limits:
    """What one engine admits and holds."""

    max_running: int = 8
    max_queued: int = 32
    kv_cache_tokens: int = 16_384
    prefill_chunk_tokens: int = 512


class Engine:
    """A loaded causal LM and its continuous-batching loop (one background thread).

    Args:
        directory: The version's Hugging Face directory (config, safetensors, tokenizer).
        limits: Admission and cache sizes.
        device: ``cpu`` or ``cuda``.
    """

    def __init__(
        self,
        directory: Path,
        limits: Limits,
        device: str = "cpu",
        adapters: multi_lora.TableSize | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        from aiaas import llm_sampling, multi_lora

        self.limits = limits
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, device_map=device)
        config = model.config
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or 2048)
        self.parameters = sum(p.numel() for p in model.parameters())
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else list(eos or []))
        # Greedy for the engine (its argmax): our sampler samples the rows that ask for it.
        generation = GenerationConfig(
            do_sample=False,
            max_new_tokens=16,
            eos_token_id=sorted(self.eos_ids) or None,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        self.adapters = None if adapters is None else multi_lora.AdapterTable(model, adapters)
        served_with_adapters: dict[str, Any] = {}
        if self.adapters is not None:
            served_with_adapters = {
                # A prompt's cached keys and values depend on its adapter; the cache's prefix
                # blocks are shared by token ids alone.
                "allow_block_sharing": False,
                # The adapter of each token changes every step: nothing a graph can capture,
                # and a step prepared while the last one runs would overwrite its ranges.
                "use_cuda_graph": False,
                "use_async_batching": False,
            }
        batching = ContinuousBatchingConfig(
            page_size=PAGE_TOKENS,
            num_blocks=max(2, math.ceil(limits.kv_cache_tokens / PAGE_TOKENS)),
            max_batch_tokens=limits.prefill_chunk_tokens,
            max_requests_per_batch=limits.max_running,
            **served_with_adapters,
        )
        self._manager = model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=batching
        )
        self.sampler = llm_sampling.Sampler()
        # Before start(): the loop's batch processor takes the list when it is created.
        table = self.adapters
        self._manager.logit_processor = self.sampler.processors(
            None if table is None else lambda batch: table.step(adapter_ranges(batch))
        )
        self._manager.start()
        self._ids = itertools.count()
        self.admitted = 0  # requests inside the engine: queued or generating
        self.running = 0  # of those, the ones that have produced a token

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt token ids of a chat, through the model's own chat template."""
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)

    def text_prompt(self, prompt: str) -> list[int]:
        """The token ids of a raw completion prompt."""
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    @property
    def waiting(self) -> int:
        return self.admitted - self.running

    @property
    def alive(self) -> bool:
        status = self._manager.background_thread_status
        return self._manager.is_running() and status.fatal_error is None

    async def generate(
        self, prompt: list[int], sampling: Sampling, adapter: int | None = None
    ) -> AsyncGenerator[list[int]]:
        """Yield the request's new token ids as the engine produces them (usually one at a
        time), until it ends; closing the iterator early cancels the request in the engine.
        ``adapter`` is a slot of the engine's adapter table (the caller holds its lease).

        Raises:
            Overloaded: No running or queued place is free.
            EngineFailed: The engine failed the request or is dead.
        """
        if not self.alive:
            raise EngineFailed("the generation engine has stopped")
        if self.admitted >= self.limits.max_running + self.limits.max_queued:
            raise Overloaded()
        request_id = f"aiaas-{next(self._ids)}"
        outputs: asyncio.Queue[Any] = asyncio.Queue()
        self._manager.register_result_handler(request_id, outputs.put_nowait)
        extra: dict[str, Any] = {} if sampling.seed is None else {"seed": sampling.seed % SEEDS}
        if adapter is not None:
            extra["adapter"] = adapter
        self.admitted += 1
        started = finished = False
        try:
            self._manager.add_request(
                prompt,
                request_id=request_id,
                max_new_tokens=sampling.max_new_tokens,
                streaming=True,
                temperature=float(sampling.temperature),
                top_p=float(sampling.top_p),
                **extra,
            )
            sent = 0
            while True:
                output = await outputs.get()
                if output.error is not None:
                    finished = True
                    raise EngineFailed(str(output.error)[:300])
                if not started and output.generated_tokens:
                    started = True
                    self.running += 1
                tokens = output.generated_tokens
                if len(tokens) > sent:
                    yield list(tokens[sent:])
                    sent = len(tokens)
                if output.is_finished():
                    finished = True
                    return
        finally:
            self.sampler.forget(request_id)
            self.admitted -= 1
            if started:
                self.running -= 1
            if not finished:
                # Cancelled engine requests deliver nothing more: drop the handler too.
                self._manager.cancel_request(request_id)
                with self._manager.output_router._lock:
                    self._manager.output_router.result_handlers.pop(request_id, None)

    def warm_up(self) -> float:
        """Generate a few tokens once (the first step pays for lazy initialisation); seconds."""
        started = time.perf_counter()

        async def run() -> None:
            async for _ in self.generate(self.text_prompt("Hello"), Sampling(4, 0.0)):
                pass

        # In a thread of its own: the caller may be inside a running event loop (a replica's).
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, run()).result()
        return time.perf_counter() - started

    def close(self) -> None:
        """Stop the loop; requests still inside fail (callers drain first)."""
        try:
            self._manager.stop(block=True, timeout=10)
        except Exception as exc:  # a loop that already died: nothing left to stop
            logger.warning("stopping the generation engine: %s", exc)


def adapter_ranges(batch: list[Any]) -> list[tuple[int, int, int]]:
    """The token ranges ``(start, end, slot)`` of the requests of one engine step that use an
    adapter: the engine lays each request's tokens out in batch order."""
    ranges = []
    start = 0
    for future in batch:
        end = start + future.query_length
        slot = future.state.logit_processor_kwargs.get("adapter")
        if slot is not None:
            ranges.append((start, end, slot))
        start = end
    return ranges
