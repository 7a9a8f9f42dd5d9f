"""The named adapters of a server with many on one base model: the front end's half.

The engine's half is ``talan_serve.adapter_set`` (run by ``talan_serve.engine``). Here,
for every engine: what the server is sized for at start (``size_adapters``), names to
engine adapter ids, what a new checkpoint must fit, the allowlist for loading at run time,
loads and unloads one at a time with the in-flight count that lets an unload wait for its
adapter's last request (``ServedAdapters``), and each request's route by its ``model``.
A backend supplies only its engine's four calls (``AdapterEngine``). Ids are never reused,
so neither a late request nor a prefix-cache entry of an unloaded adapter can reach
another one. This module imports no backend: the backends import it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from talan_serve.adapter_spec import AdapterSetError, AdapterSetSpec
from talan_serve.checkpoint import CheckpointError, TalanCheckpoint, load_checkpoint
from talan_serve.switch import switch_args

logger = logging.getLogger(__name__)

FIRST_ADAPTER_ID = 1  # 0 is a one-checkpoint server's adapter; vLLM's LoRA ids start at 1


class AdapterError(ValueError):
    """A load or unload that cannot be done (answered as HTTP 400)."""


class ModelNotFoundError(LookupError):
    """A ``model`` that is not, or no longer, served (answered as HTTP 404)."""


@dataclass
class Adapter:
    name: str
    adapter_id: int
    checkpoint: TalanCheckpoint
    lora_rank: int | None
    in_flight: int = 0
    retired: bool = False

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    @property
    def has_talan(self) -> bool:
        return self.checkpoint.has_talan


def _lora_rank(checkpoint: TalanCheckpoint) -> int | None:
    if checkpoint.adapter_dir is None:
        return None
    from talan_serve.prepared import adapter_config, lora_rank

    if adapter_config(checkpoint.adapter_dir).get("use_dora"):
        raise AdapterError("DoRA adapters are served merged into the weights, one per "
                           "server: serve this checkpoint on its own")
    return lora_rank(checkpoint.adapter_dir)


class AdapterRegistry:
    """The adapters a server holds, by the name a request puts in ``model``."""

    def __init__(self, spec: AdapterSetSpec, num_layers: int, capacity: int,
                 max_lora_rank: int | None, kinds_fixed: bool = False):
        self.spec = spec
        self.num_layers = num_layers
        self.capacity = capacity
        self.max_lora_rank = max_lora_rank
        # The engine captures decode steps in graphs holding the kinds built at start.
        self.kinds_fixed = kinds_fixed
        self._adapters: dict[str, Adapter] = {}
        self._next_id = FIRST_ADAPTER_ID

    def get(self, name: str | None) -> Adapter | None:
        adapter = self._adapters.get(name) if name is not None else None
        return None if adapter is None or adapter.retired else adapter

    def names(self) -> list[str]:
        return [name for name, adapter in self._adapters.items() if not adapter.retired]

    def served(self) -> list[Adapter]:
        return [adapter for adapter in self._adapters.values() if not adapter.retired]

    def reserve(self, name: str, path: str | Path) -> Adapter:
        """Validate a checkpoint for ``name`` and give it the next id (not yet served)."""
        if not name or name in self._adapters:
            raise AdapterError(f"an adapter named {name!r} is loaded already" if name
                               else "an adapter needs a name")
        if len(self._adapters) >= self.capacity:
            raise AdapterError(f"{self.capacity} adapters are loaded, the most this server "
                               "holds (--max-adapters); unload one first")
        try:
            checkpoint = load_checkpoint(path)
            checkpoint.check_host(self.spec.hidden_size, self.num_layers)
        except (CheckpointError, FileNotFoundError) as error:
            raise AdapterError(f"adapter {name!r}: {error}") from error
        if checkpoint.has_talan:
            try:
                self.spec.check(checkpoint.config, self.kinds_fixed)
            except AdapterSetError as error:
                raise AdapterError(f"adapter {name!r}: {error}") from error
        rank = _lora_rank(checkpoint)
        if rank is not None and self.max_lora_rank is not None and rank > self.max_lora_rank:
            raise AdapterError(f"adapter {name!r}: LoRA rank {rank} is above this server's "
                               f"--max-lora-rank {self.max_lora_rank}")
        adapter = Adapter(name, self._next_id, checkpoint, rank, retired=True)
        self._next_id += 1
        self._adapters[name] = adapter
        return adapter

    def publish(self, adapter: Adapter) -> None:
        adapter.retired = False

    def drop(self, adapter: Adapter) -> None:
        self._adapters.pop(adapter.name, None)

    def retire(self, name: str) -> Adapter:
        """Stop routing new requests to ``name``; its running requests go on."""
        adapter = self.get(name)
        if adapter is None:
            raise ModelNotFoundError(f"no adapter named {name!r} is loaded")
        adapter.retired = True
        return adapter

    @contextmanager
    def using(self, adapter: Adapter | None) -> Iterator[None]:
        if adapter is not None:
            adapter.in_flight += 1
        try:
            yield
        finally:
            if adapter is not None:
                adapter.in_flight -= 1

    async def drained(self, adapter: Adapter, poll_s: float = 0.02) -> None:
        while adapter.in_flight:
            await asyncio.sleep(poll_s)


def allowed_path(path: str, allowed_dirs: tuple[Path, ...]) -> Path:
    """``path`` resolved, if it lies inside one of ``allowed_dirs``; raises otherwise."""
    resolved = Path(os.path.realpath(path))
    for root in allowed_dirs:
        root = Path(os.path.realpath(root))
        if resolved == root or root in resolved.parents:
            return resolved
    raise PermissionError(f"{path!r} is not inside a directory this server loads adapters "
                          "from (--allowed-adapter-dirs)")


@dataclass(frozen=True)
class AdapterSizing:
    """A server of many adapters, as sized at start: the engine's adapter set, the LoRA
    rank it reserves (None: no LoRA support) and the registry that fronts it."""

    spec: AdapterSetSpec
    lora_rank: int | None
    registry: AdapterRegistry


def size_adapters(
    model_dir: str | Path,
    adapters: dict[str, str],
    max_adapters: int,
    state_slots: int | None = None,
    connection_points: tuple[str, ...] = (),
    max_lora_rank: int | None = None,
    lora_rank_for: Callable[[int], int] = int,
    kinds_fixed: bool = False,
) -> AdapterSizing:
    """Size a server of many adapters on the base ``model_dir`` for those given at start
    (``adapters``: name -> checkpoint) and the room asked for; ``lora_rank_for``: the
    engine's LoRA rank for a checkpoint's rank; ``kinds_fixed``: the engine captures its
    decode steps in graphs that hold the adapter kinds given at start."""
    from talan_serve.prepared import lora_rank

    host = json.loads((Path(model_dir) / "config.json").read_text())
    checkpoints = [load_checkpoint(path) for path in adapters.values()]
    spec = AdapterSetSpec.covering(
        [c.config for c in checkpoints if c.has_talan], host["hidden_size"],
        state_slots, connection_points, max_adapters)
    ranks = [lora_rank(c.adapter_dir) for c in checkpoints if c.adapter_dir is not None]
    rank = max_lora_rank or (max(ranks) if ranks else None)
    rank = None if rank is None else lora_rank_for(rank)
    registry = AdapterRegistry(spec, host["num_hidden_layers"], max_adapters, rank,
                               kinds_fixed)
    return AdapterSizing(spec, rank, registry)


class AdapterEngine(Protocol):
    """What a backend's engine does for ``ServedAdapters``: TALAN blocks go to every worker
    of the engine, LoRAs through its multi-LoRA support (a handle for requests to carry)."""

    async def load_talan(self, adapter_id: int, checkpoint_dir: str) -> None: ...

    async def unload_talan(self, adapter_id: int) -> None: ...

    async def load_lora(self, name: str, adapter_id: int, lora_dir: Path) -> Any: ...

    async def unload_lora(self, adapter_id: int, handle: Any) -> None: ...


@dataclass(frozen=True)
class RequestRoute:
    """What one request runs: its adapter (None: a one-checkpoint server's or the base
    model), the engine's LoRA handle, and the engine arguments of the TALAN switch."""

    adapter: Adapter | None
    lora: Any
    talan_args: dict[str, Any]


class ServedAdapters:
    """The front end's half of a server of many adapters, whatever the engine: loads and
    unloads (one at a time; an unload waits for the adapter's running requests), and the
    route of each request by its ``model``."""

    def __init__(self, registry: AdapterRegistry, engine: AdapterEngine, base_name: str):
        self.registry = registry
        self.engine = engine
        self.base_name = base_name
        self._loras: dict[int, Any] = {}
        self._lock = asyncio.Lock()

    async def load(self, name: str, path: str) -> None:
        async with self._lock:
            adapter = self.registry.reserve(name, path)
            loaded_talan = False
            try:
                lora_dir = adapter.checkpoint.adapter_dir
                if lora_dir is not None and self.registry.max_lora_rank is None:
                    raise AdapterError(f"adapter {name!r} has a LoRA, and this server was "
                                       "started without LoRA support (--max-lora-rank)")
                if adapter.has_talan:
                    await self.engine.load_talan(adapter.adapter_id, str(adapter.path))
                    loaded_talan = True
                if lora_dir is not None:
                    self._loras[adapter.adapter_id] = await self.engine.load_lora(
                        name, adapter.adapter_id, lora_dir)
            except BaseException:
                if loaded_talan:
                    await self.engine.unload_talan(adapter.adapter_id)
                self.registry.drop(adapter)
                raise
            self.registry.publish(adapter)
            logger.info("adapter %s loaded from %s (id %d, TALAN %s, LoRA rank %s)", name,
                        adapter.path, adapter.adapter_id,
                        adapter.checkpoint.config.connection_point if adapter.has_talan
                        else "none", adapter.lora_rank)

    async def unload(self, name: str) -> None:
        async with self._lock:
            adapter = self.registry.retire(name)
            await self.registry.drained(adapter)
            if adapter.has_talan:
                await self.engine.unload_talan(adapter.adapter_id)
            handle = self._loras.pop(adapter.adapter_id, None)
            if handle is not None:
                await self.engine.unload_lora(adapter.adapter_id, handle)
            self.registry.drop(adapter)
            logger.info("adapter %s unloaded", name)

    def route(self, model: str | None, talan_enabled: bool) -> RequestRoute:
        if model is None or model == self.base_name:
            return RequestRoute(None, None, switch_args(False))  # the base model alone
        adapter = self.registry.get(model)
        if adapter is None:
            raise ModelNotFoundError(f"The model '{model}' does not exist")
        lora = self._loras.get(adapter.adapter_id)
        if not (talan_enabled and adapter.has_talan):
            return RequestRoute(adapter, lora, switch_args(False))
        return RequestRoute(adapter, lora, switch_args(True, adapter.adapter_id))

    def in_flight(self, route: RequestRoute):
        return self.registry.using(route.adapter) if route.adapter is not None \
            else nullcontext()


ONE_CHECKPOINT = ("this server serves one checkpoint; start it with --adapters (or "
                  "--talan-connection-points) to load adapters")
