"""Many LoRA adapters on one base model in one continuous batch: each token takes its own
request's adapter.

peft applies adapters to whole batch rows (its mixed-batch inference, ``adapter_names=``), but
transformers' continuous batching packs every request into one row of tokens, so here the choice
is made per token — hand-written, as neither library has it (vLLM's multi-LoRA kernels do, on
GPUs). The base model's target linear layers are wrapped once (:class:`AdapterTable`); an adapter
is copied into one of ``capacity`` fixed slots of preallocated A/B matrices (rank at most
``max_rank``, smaller ranks zero-padded); before every engine step the engine names the token
ranges of each slot (:meth:`AdapterTable.step`), and each wrapped layer adds
``scale · B·A·x`` for those tokens only. Base tokens, and layers an adapter leaves alone, cost a
set lookup.

The base weights are shared and never changed: N adapters cost their A/B matrices (a few MB
each), not N copies of the model. Adapters change the keys and values a prompt leaves in the KV
cache, so an engine with a table must not share cached prefix blocks across requests
(:mod:`aiaas.llm_engine` turns that off).
"""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

_TENSOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


class AdapterProblem(Exception):
    """An adapter this table cannot serve; the message says why and what would fit."""


class NoFreeSlot(Exception):
    """Every slot holds an adapter that a request still uses."""


@dataclass(frozen=True)
class TableSize:
    """How many adapters one engine holds at once, how large, on which projections."""

    capacity: int
    max_rank: int
    targets: tuple[str, ...]  # names of the linear layers adapters may change (q_proj, ...)


@dataclass(frozen=True)
class AdapterWeights:
    """One adapter read from peft's files: its A and B matrices by module, and its scale."""

    rank: int
    scale: float
    matrices: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module → (A [r, in], B [out, r])


def read(directory: Path) -> AdapterWeights:
    """A peft LoRA adapter directory (``adapter_config.json``, ``adapter_model.safetensors``).

    Raises:
        AdapterProblem: It uses what plain LoRA serving cannot apply (DoRA, biases, saved whole
            modules, per-module ranks or alphas), or its tensors are not A/B pairs.
    """
    from safetensors.torch import load_file

    config = json.loads((directory / "adapter_config.json").read_text())
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "bias": config.get("bias", "none") not in (None, "none"),
        "modules_to_save": bool(config.get("modules_to_save")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
    }
    used = [key for key, set_ in unsupported.items() if set_]
    if used:
        raise AdapterProblem(
            f"the adapter sets {', '.join(used)} in adapter_config.json; served adapters are "
            "plain LoRA (one rank and alpha, no bias, no saved modules)"
        )
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    pieces: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(directory / "adapter_model.safetensors")).items():
        found = _TENSOR.match(key)
        if found is None:
            raise AdapterProblem(f"tensor '{key}' is no LoRA A or B matrix")
        pieces.setdefault(found["module"], {})[found["ab"]] = tensor
    matrices = {}
    for module, pair in pieces.items():
        if set(pair) != {"A", "B"}:
            raise AdapterProblem(f"module '{module}' has lora_{''.join(pair)} only")
        a, b = pair["A"], pair["B"]
        if a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterProblem(
                f"module '{module}' has rank {a.shape[0]}/{b.shape[1]}, the config says {rank}"
            )
        matrices[module] = (a, b)
    if not matrices:
        raise AdapterProblem("the adapter holds no LoRA matrices")
    return AdapterWeights(rank, scale, matrices)


class MultiLoraLinear(nn.Module):
    """A base linear layer plus the table's adapter slots for it."""

    lora_a: torch.Tensor  # [capacity, max_rank, in]
    lora_b: torch.Tensor  # [capacity, out, max_rank]

    def __init__(self, base: nn.Linear, table: AdapterTable, size: TableSize) -> None:
        super().__init__()
        self.base = base
        self.table = table
        weight = base.weight
        shape_a = (size.capacity, size.max_rank, base.in_features)
        shape_b = (size.capacity, base.out_features, size.max_rank)
        # Buffers, not parameters: they are no model weights (and never trained here).
        self.register_buffer(
            "lora_a", torch.zeros(shape_a, dtype=weight.dtype, device=weight.device)
        )
        self.register_buffer(
            "lora_b", torch.zeros(shape_b, dtype=weight.dtype, device=weight.device)
        )
        self.scales = [0.0] * size.capacity
        self.live: frozenset[int] = frozenset()  # the slots that touch this layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        groups = self.table.groups
        if not groups or not self.live:
            return out
        flat_x = x.reshape(-1, x.shape[-1])
        flat_out = out.view(-1, out.shape[-1])
        for slot, tokens in groups:
            if slot not in self.live:
                continue
            rows = flat_x.index_select(0, tokens)
            delta = (rows @ self.lora_a[slot].T) @ self.lora_b[slot].T
            flat_out.index_add_(0, tokens, delta, alpha=self.scales[slot])
        return out


class AdapterTable:
    """The adapter slots of one model: wraps its target projections once, at creation."""

    def __init__(self, model: nn.Module, size: TableSize) -> None:
        self.size = size
        self.layers: dict[str, MultiLoraLinear] = {}
        wanted = set(size.targets)
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in wanted:
                wrapped = MultiLoraLinear(module, self, size)
                model.set_submodule(name, wrapped)
                self.layers[name] = wrapped
        if not self.layers:
            raise AdapterProblem(
                f"the model has no linear layer named {', '.join(size.targets)}; set "
                "adapter_targets to its projection names"
            )
        self.device = next(iter(self.layers.values())).lora_a.device
        self.groups: list[tuple[int, torch.Tensor]] = []
        self._free = list(range(size.capacity))
        self._lock = threading.Lock()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def check(self, adapter: AdapterWeights) -> None:
        """Raise :class:`AdapterProblem` unless ``adapter`` fits this model and table."""
        if adapter.rank > self.size.max_rank:
            raise AdapterProblem(
                f"the adapter has rank {adapter.rank}; this app serves rank {self.size.max_rank} "
                "at most (raise max_adapter_rank)"
            )
        for module, (a, b) in adapter.matrices.items():
            layer = self.layers.get(module)
            if layer is None:
                raise AdapterProblem(
                    f"the adapter changes '{module}', which the served base model does not have "
                    f"as an adapter target ({', '.join(self.size.targets)})"
                )
            base = layer.base
            if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
                raise AdapterProblem(
                    f"the adapter's '{module}' is {b.shape[0]}×{a.shape[1]}; the base model's is "
                    f"{base.out_features}×{base.in_features}: it was trained on another model"
                )

    def install(self, adapter: AdapterWeights) -> int:
        """Copy ``adapter`` into a free slot and return the slot.

        Raises:
            AdapterProblem: It does not fit (see :meth:`check`). NoFreeSlot: no slot is free.
        """
        self.check(adapter)
        with self._lock:
            if not self._free:
                raise NoFreeSlot()
            slot = self._free.pop(0)
        rank = adapter.rank
        with torch.no_grad():
            for module, layer in self.layers.items():
                pair = adapter.matrices.get(module)
                layer.lora_a[slot].zero_()
                layer.lora_b[slot].zero_()
                if pair is None:
                    continue
                layer.lora_a[slot, :rank].copy_(pair[0])
                layer.lora_b[slot, :, :rank].copy_(pair[1])
                layer.scales[slot] = adapter.scale
                layer.live = layer.live | {slot}
        return slot

    def release(self, slot: int) -> None:
        """Free ``slot`` (no request may use it any more)."""
        for layer in self.layers.values():
            layer.live = layer.live - {slot}
        with self._lock:
            self._free.append(slot)

    def step(self, ranges: list[tuple[int, int, int]]) -> None:
        """Set the token ranges ``(start, end, slot)`` of the next forward pass (base tokens
        are in none)."""
        by_slot: dict[int, list[torch.Tensor]] = {}
        for start, end, slot in ranges:
            by_slot.setdefault(slot, []).append(torch.arange(start, end))
        self.groups = [
            (slot, torch.cat(parts).to(self.device)) for slot, parts in sorted(by_slot.items())
        ]


class Lease:
    """One use of an installed adapter; the slot is freed when the last lease ends."""

    def __init__(self, installed: Installed) -> None:
        self._installed: Installed | None = installed

    @property
    def slot(self) -> int:
        assert self._installed is not None
        return self._installed.slot

    def close(self) -> None:
        installed, self._installed = self._installed, None
        if installed is not None:
            installed.drop()

    def __del__(self) -> None:
        # A stream that never started (a client gone before its response began) never runs
        # its own cleanup: the lease it held ends here.
        self.close()


class Installed:
    """An adapter in a slot of one table, counted: its holder's reference plus its leases."""

    def __init__(self, table: AdapterTable, slot: int, key: Any) -> None:
        self.table = table
        self.slot = slot
        self.key = key
        self._count = 1
        self._lock = threading.Lock()

    def lease(self) -> Lease | None:
        """A new lease, or None when the slot was already freed."""
        with self._lock:
            if self._count == 0:
                return None
            self._count += 1
        return Lease(self)

    def drop(self) -> None:
        with self._lock:
            self._count -= 1
            freed = self._count == 0
        if freed:
            self.table.release(self.slot)


class Holder:
    """One served adapter in one replica, as its cache keeps it: installed on first use, again
    when its version or its base engine changes, and let go when the cache evicts it (Ray
    Serve's multiplexing calls ``__del__``; streams still running keep their slot until they
    end)."""

    def __init__(self) -> None:
        self._current: Installed | None = None

    def lease(self, table: AdapterTable, adapter: AdapterWeights, key: Any) -> Lease:
        """A lease of ``adapter`` (identified by ``key``) in ``table``.

        Raises:
            AdapterProblem, NoFreeSlot: as :meth:`AdapterTable.install`.
        """
        current = self._current
        if current is None or current.key != key or current.table is not table:
            current = install(table, adapter, key)
            old, self._current = self._current, current
            if old is not None:
                old.drop()
        lease = current.lease()
        assert lease is not None  # the holder's own reference keeps it installed
        return lease

    def __del__(self) -> None:
        current, self._current = self._current, None
        if current is not None:
            current.drop()


def install(table: AdapterTable, adapter: AdapterWeights, key: Any) -> Installed:
    """``adapter`` in a slot of ``table``, held once (:meth:`Installed.drop` lets it go)."""
    return Installed(table, table.install(adapter), key)


def describe(adapter: AdapterWeights) -> dict[str, Any]:
    """What a status page shows of an adapter."""
    weights = sum(a.numel() + b.numel() for a, b in adapter.matrices.values())
    return {"rank": adapter.rank, "modules": len(adapter.matrices), "weights": weights}
