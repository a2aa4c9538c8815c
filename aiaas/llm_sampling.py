"""Per-request sampling inside transformers' continuous batching: greedy rows cost nothing, and a
request's ``seed`` chooses its own random stream.

The engine's own per-request processors (temperature, top-p) need ``do_sample=True`` for the whole
batch: every step then sorts the full vocabulary for top-p and draws from a softmax for every
row, greedy ones included (~30% of a decoding step for SmolLM2's 49k-token vocabulary, measured in
``bench/llm.py``), and all rows share one random generator, so no seed can hold. Ours is one
processor the engine runs with ``do_sample=False`` (its argmax): rows with temperature 0 are left
alone, and only the rows that sample are scaled, cut to their top-p nucleus and given Gumbel
noise — the argmax of ``logits / T + Gumbel`` is an exact draw from ``softmax(logits / T)`` — from
the request's own ``torch.Generator`` (seeded by its ``seed`` when it sends one).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.logits_process import LogitsProcessorList

logger = logging.getLogger("ray.serve")


class Sampler(ContinuousBatchingLogitsProcessor):
    """Temperature, top-p and seeded draws per request, as one continuous-batching processor.

    The engine hands it the batch's requests (``prepare_tensor_args``) and then the logits of
    those requests in the same order (``__call__``), one step at a time on its own thread.
    """

    def __init__(self) -> None:
        # ``adapter`` is the batch hook's (the engine's adapter slot of a request), not ours.
        self.supported_kwargs = {"temperature": float, "top_p": float, "seed": int, "adapter": int}
        self.ignored_kwargs = ()
        self._rows: list[tuple[str, float, float, int | None]] = []
        self._generators: dict[str, torch.Generator] = {}
        self._lock = threading.Lock()
        self._unseeded = torch.Generator().manual_seed(torch.seed())

    def processors(
        self, before_batch: Callable[[list[Any]], None] | None = None
    ) -> ContinuousBatchingLogitsProcessorList:
        """The engine's processor list holding only this one; ``before_batch`` is told of each
        step's whole batch (every request, in token order) before the step runs."""
        found = Processors(LogitsProcessorList([self]), before_batch)
        found.tensors_required = 1  # one argument row; ours carries nothing the step reads
        return found

    def forget(self, request_id: str) -> None:
        """Drop a finished request's generator."""
        with self._lock:
            self._generators.pop(request_id, None)

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        rows = []
        for request in requests_with_new_token:
            kwargs = request.state.logit_processor_kwargs
            rows.append(
                (
                    request.state.request_id,
                    float(kwargs.get("temperature", 0.0)),
                    float(kwargs.get("top_p", 1.0)),
                    kwargs.get("seed"),
                )
            )
        self._rows = rows
        return torch.zeros(len(rows), dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        rows = self._rows
        if scores.size(0) < len(rows):  # not the batch prepared last: stay greedy, say so
            logger.warning("sampler: %d logits rows for %d requests", scores.size(0), len(rows))
            return scores
        sampled = [i for i, row in enumerate(rows) if row[1] > 0]
        if not sampled:
            return scores
        scores = scores.clone()
        for i in sampled:
            request_id, temperature, top_p, seed = rows[i]
            row = scores[i] / temperature
            if top_p < 1.0:
                ordered, order = torch.sort(row, descending=True)
                probabilities = ordered.softmax(-1)
                # Keep the smallest set whose probability reaches top_p (the first token always):
                # drop a token when the ones before it already hold top_p.
                drop = probabilities.cumsum(-1) - probabilities >= top_p
                row = row.index_fill(0, order[drop], float("-inf"))
            uniform = torch.rand(row.shape, generator=self._generator(request_id, seed))
            gumbel = -torch.log(-torch.log(uniform.clamp_(1e-20, 1.0 - 1e-7)))
            scores[i] = row + gumbel
        return scores

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator:
        if seed is None:
            return self._unseeded
        with self._lock:
            found = self._generators.get(request_id)
            if found is None:
                found = self._generators[request_id] = torch.Generator().manual_seed(seed)
            return found


class Processors(ContinuousBatchingLogitsProcessorList):
    """The engine's processor list, with a hook on each whole batch: processors see only the
    requests that get a new token, an adapter table needs every request's tokens."""

    def __init__(
        self, processors: LogitsProcessorList, before_batch: Callable[[list[Any]], None] | None
    ) -> None:
        super().__init__(processors)
        self.before_batch = before_batch

    def prepare_tensor_args(self, requests_in_batch: list[Any], arg_storage: torch.Tensor) -> Any:
        if self.before_batch is not None:
            self.before_batch(requests_in_batch)
        return super().prepare_tensor_args(requests_in_batch, arg_storage)
