"""The named adapters of a server with many on one base model: the front end's half.

The engine's half is ``talan_serve.adapter_set`` (run by ``talan_serve.engine``). Here,
for every engine: what the server is sized for at start (``size_adapters``), names to
engine adapter ids, what a new checkpoint must fit, the allowlist for loading at run time,
and ``ServedAdapters``: loads and unloads, each request's route by its ``model``, and, with
``--adapter-dir``, adapters loaded on their first request.

Every checkpoint is validated whole before it takes a place (``talan_serve.adapter_files``
and ``AdapterRegistry.check_fits``), off the event loop; the engine then gets the
validated weights (the files' bytes that were checked), never a path to read again. A
place is an adapter loaded in the engine, ``--max-adapters`` of them. When every place is
taken, the least recently used adapter with no request in flight (and none about to
start) is evicted, into a host-memory cache (``server.adapter_cache``); adapters loaded
explicitly (``--adapters``, ``/v1/load_lora_adapter``) are pinned. A load for which no
place can be freed waits until a request ends, and the requests waiting for their
adapter are bounded (past the bound: ``AdapterQueueFull``, HTTP 429). However many
requests ask for one adapter at once, it is loaded once. A place is taken (and the
adapter it evicts chosen) on the event loop with no await in between; the engine calls
that follow run concurrently, so that loads waiting together reach the engine together
(one wait for a step, not one each). Ids are never reused, so neither a late request nor
a prefix-cache entry of an unloaded adapter can reach another one. A backend supplies
only its engine's two calls (``AdapterEngine``). This module imports no backend: the
backends import it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from server.adapter_cache import AdapterCache, CacheKey
from server.adapter_dir import AdapterDirectory, DirectoryEntry, Holds
from server.adapter_errors import (
    AdapterError,
    AdapterQueueFull,
    AdapterRefused,
    ModelNotFoundError,
)
from talan_serve.adapter_files import AdapterWeights, BaseWeights, read_adapter
from talan_serve.adapter_spec import AdapterSetError, AdapterSetSpec
from talan_serve.checkpoint import CheckpointError, load_checkpoint
from talan_serve.config import TalanConfig
from talan_serve.switch import switch_args

logger = logging.getLogger(__name__)

FIRST_ADAPTER_ID = 1  # 0 is a one-checkpoint server's adapter; vLLM's LoRA ids start at 1
REFUSALS_KEPT = 256  # refused folders remembered (by fingerprint), so as not to reread them


class Stage(Enum):
    """Where an adapter is on its way through the engine; only a served one is routed to."""

    LOADING = "loading"  # holds a place; its engine call is under way
    SERVED = "served"
    UNLOADING = "unloading"  # still holds its place until its running requests end
    EVICTED = "evicted"  # its place is the evicting load's already


@dataclass
class Adapter:
    name: str
    adapter_id: int
    weights: AdapterWeights
    cache_key: CacheKey | None = None
    pinned: bool = False
    in_flight: int = 0
    stage: Stage = Stage.LOADING
    last_used: float = field(default_factory=time.monotonic)

    @property
    def retired(self) -> bool:
        """Not routed to: loading, or leaving."""
        return self.stage is not Stage.SERVED

    @property
    def leaving(self) -> bool:
        """On its way out of the engine: unloaded or evicted."""
        return self.stage in (Stage.UNLOADING, Stage.EVICTED)

    @property
    def path(self) -> Path:
        return self.weights.path

    @property
    def has_talan(self) -> bool:
        return self.weights.has_talan

    @property
    def lora_rank(self) -> int | None:
        return self.weights.lora_rank


class AdapterRegistry:
    """The adapters a server holds, by the name a request puts in ``model``."""

    def __init__(self, spec: AdapterSetSpec, base: BaseWeights, capacity: int,
                 max_lora_rank: int | None, kinds_fixed: bool = False):
        self.spec = spec
        self.base = base
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

    @property
    def places_taken(self) -> int:
        """Adapters holding a place: served, loading, or unloading (an evicted one's place
        is the load's that evicts it)."""
        return len(self.holders())

    def check_fits(self, name: str, weights: AdapterWeights) -> None:
        """Raise ``AdapterError`` unless a validated checkpoint fits what this server was
        started for (state slots, connection points, kinds, LoRA support and rank)."""
        if weights.has_talan:
            try:
                self.spec.check(weights.config, self.kinds_fixed)
            except AdapterSetError as error:
                raise AdapterError(f"adapter {name!r}: {error}") from error
        rank = weights.lora_rank
        if rank is not None and self.max_lora_rank is None:
            raise AdapterError(f"adapter {name!r} has a LoRA, and this server was started "
                               "without LoRA support (--max-lora-rank)")
        if rank is not None and rank > self.max_lora_rank:
            raise AdapterError(f"adapter {name!r}: LoRA rank {rank} is above this server's "
                               f"--max-lora-rank {self.max_lora_rank}")

    def reserve(self, name: str, weights: AdapterWeights, cache_key: CacheKey | None = None,
                pinned: bool = False, evicting: Adapter | None = None) -> Adapter:
        """Give a validated checkpoint that fits (``check_fits``) a place, ``evicting``'s
        if given (retired, leaving with this load), and the next id (not yet served)."""
        if not name or name in self._adapters:
            raise AdapterError(f"an adapter named {name!r} is loaded already" if name
                               else "an adapter needs a name")
        if self.places_taken - (evicting is not None) >= self.capacity:
            raise AdapterError(f"{self.capacity} adapters are loaded, the most this server "
                               "holds (--max-adapters); unload one first")
        if evicting is not None:
            evicting.stage = Stage.EVICTED
        adapter = Adapter(name, self._next_id, weights, cache_key, pinned)
        self._next_id += 1
        self._adapters[name] = adapter
        return adapter

    def holders(self) -> list[Adapter]:
        """The adapters holding a place (``places_taken`` of them)."""
        return [adapter for adapter in self._adapters.values()
                if adapter.stage is not Stage.EVICTED]

    def named(self, name: str) -> Adapter | None:
        """The adapter of that name, served, loading or leaving."""
        return self._adapters.get(name)

    def publish(self, adapter: Adapter) -> None:
        adapter.stage = Stage.SERVED

    def drop(self, adapter: Adapter) -> None:
        self._adapters.pop(adapter.name, None)

    def retire(self, name: str) -> Adapter:
        """Stop routing new requests to ``name``; its running requests go on."""
        adapter = self.get(name)
        if adapter is None:
            raise ModelNotFoundError(f"no adapter named {name!r} is loaded")
        adapter.stage = Stage.UNLOADING
        return adapter


def allowed_path(path: str, allowed_dirs: tuple[Path, ...]) -> tuple[Path, Path]:
    """``path`` resolved, and the one of ``allowed_dirs`` it lies in; raises otherwise."""
    resolved = Path(os.path.realpath(path))
    for root in allowed_dirs:
        real_root = Path(os.path.realpath(root))
        if resolved == real_root or real_root in resolved.parents:
            return resolved, real_root
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
    directory: AdapterDirectory | None = None,
) -> AdapterSizing:
    """Size a server of many adapters on the base ``model_dir`` for those given at start
    (``adapters``: name -> checkpoint), the entries of ``directory`` there are now (their
    JSON files only; those beyond ``state_slots`` or ``max_lora_rank``, when given, or not
    fitting the base are left out, to be refused at their first request) and the room
    asked for; ``lora_rank_for``: the engine's LoRA rank for a checkpoint's rank;
    ``kinds_fixed``: the engine captures its decode steps in graphs that hold the adapter
    kinds given at start."""
    from talan_serve.prepared import lora_rank

    base = BaseWeights.read(model_dir)
    checkpoints = [load_checkpoint(path) for path in adapters.values()]
    configs = [c.config for c in checkpoints if c.has_talan]
    ranks = [lora_rank(c.adapter_dir) for c in checkpoints if c.adapter_dir is not None]
    for entry in directory.start_configs() if directory is not None else ():
        config = entry.config
        if config is not None and not _fits_at_start(config, base, state_slots):
            continue
        if entry.lora_rank is not None and max_lora_rank is not None \
                and entry.lora_rank > max_lora_rank:
            continue
        configs += [config] if config is not None else []
        ranks += [entry.lora_rank] if entry.lora_rank is not None else []
    spec = AdapterSetSpec.covering(configs, base.hidden_size, state_slots, connection_points,
                                   max_adapters)
    rank = max_lora_rank or (max(ranks) if ranks else None)
    rank = None if rank is None else lora_rank_for(rank)
    registry = AdapterRegistry(spec, base, max_adapters, rank, kinds_fixed)
    return AdapterSizing(spec, rank, registry)


def _fits_at_start(config: TalanConfig, base: BaseWeights, state_slots: int | None) -> bool:
    try:
        config.check_host(base.hidden_size, base.num_layers)
    except ValueError:
        return False
    return state_slots is None or config.n_themes <= state_slots


@dataclass(frozen=True)
class EngineAdapter:
    """An adapter as its engine holds it: the id, whether it has a TALAN block, and the
    engine's LoRA handle (None: no LoRA)."""

    adapter_id: int
    has_talan: bool
    lora: Any = None


class AdapterEngine(Protocol):
    """What a backend's engine does for ``ServedAdapters``, with validated weights: TALAN
    blocks go to every worker of the engine, LoRAs through its multi-LoRA support.

    An engine serves such a call between two of its steps, so each call a request waits
    on costs up to a step: an eviction and the load it makes room for come as one
    ``load``, for the engine to do in as few calls as it can, and calls for different
    adapters come concurrently, for the engine to serve in the same gap (a backend whose
    engine takes one call at a time sends those that wait together in its next call)."""

    async def load(self, name: str, adapter_id: int, weights: AdapterWeights,
                   evicting: EngineAdapter | None = None) -> Any:
        """Remove ``evicting`` (if given), then load the adapter as ``adapter_id``; the
        LoRA handle for its requests (None without a LoRA). On failure nothing of the
        new adapter stays loaded."""
        ...

    async def unload(self, adapter: EngineAdapter) -> None: ...


class AdapterEvents(Protocol):
    """What ``ServedAdapters`` reports (``server.metrics.AdapterMetrics``)."""

    def loaded(self, name: str, source: str, seconds: float) -> None: ...

    def evicted(self, name: str) -> None: ...

    def refused(self, reason: str) -> None: ...

    def request(self, name: str) -> None: ...


class NoEvents:
    """``AdapterEvents`` that go nowhere (a server without metrics, tests)."""

    def loaded(self, name: str, source: str, seconds: float) -> None:
        pass

    def evicted(self, name: str) -> None:
        pass

    def refused(self, reason: str) -> None:
        pass

    def request(self, name: str) -> None:
        pass


@dataclass(frozen=True)
class RequestRoute:
    """What one request runs: its adapter (None: a one-checkpoint server's or the base
    model), the engine's LoRA handle, and the engine arguments of the TALAN switch."""

    adapter: Adapter | None
    lora: Any
    talan_args: dict[str, Any]


class _Places:
    """Wakes the loads that wait for a place whenever one may have been freed."""

    def __init__(self) -> None:
        self.generation = 0
        self._waiters: list[asyncio.Future] = []

    def freed(self) -> None:
        self.generation += 1
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def wait(self, generation: int) -> None:
        """Return once a place was freed after ``generation`` was read."""
        if self.generation != generation:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter


@dataclass(frozen=True)
class OnDemand:
    """Where adapters loaded on their first request come from, and how many requests may
    wait for theirs."""

    directory: AdapterDirectory
    cache_bytes: int = 2**30
    queue_size: int = 64


class ServedAdapters:
    """The front end's half of a server of many adapters, whatever the engine (module
    docstring): loads and unloads, and each request's route by its ``model``."""

    def __init__(self, registry: AdapterRegistry, engine: AdapterEngine, base_name: str,
                 on_demand: OnDemand | None = None):
        self.registry = registry
        self.engine = engine
        self.base_name = base_name
        self.directory = on_demand.directory if on_demand is not None else None
        self.cache = AdapterCache(on_demand.cache_bytes if on_demand is not None else 0)
        self.queue_size = on_demand.queue_size if on_demand is not None else 0
        self.events: AdapterEvents = NoEvents()
        self._loras: dict[int, Any] = {}
        self._loads: dict[str, asyncio.Task] = {}  # one load per name at a time
        self._pending: Counter[str] = Counter()  # requests about to run each adapter
        self._waiting = 0  # requests waiting for their adapter to be loaded
        self._places = _Places()
        self._refusals: OrderedDict[CacheKey, AdapterRefused] = OrderedDict()

    # --- validation --------------------------------------------------------------------

    async def _weights(self, name: str, path: Path, within: Path | None
                       ) -> tuple[AdapterWeights, CacheKey, str]:
        """A checkpoint's validated contents, from the cache or read and validated off
        the event loop; where they came from ("cache" or "disk")."""
        try:
            key = AdapterCache.key(path)
        except OSError as error:
            raise AdapterRefused(f"adapter {name!r}: {error}", "checkpoint") from None
        cached = self.cache.take(key)
        if cached is not None:
            return cached, key, "cache"
        refused = self._refusals.get(key)
        if refused is not None:
            raise AdapterRefused(str(refused), refused.reason, refused.status, refused.code)
        try:
            weights = await asyncio.to_thread(read_adapter, path, self.registry.base, within)
            self.registry.check_fits(name, weights)
        except AdapterError as error:
            refused = AdapterRefused(str(error), "unfit")
        except PermissionError as error:
            refused = AdapterRefused(f"adapter {name!r}: {error}", "path", 403,
                                     "adapter_path_not_allowed")
        except (CheckpointError, OSError) as error:
            refused = AdapterRefused(f"adapter {name!r}: {error}", "checkpoint")
        else:
            return weights, key, "disk"
        self._refusals[key] = refused
        while len(self._refusals) > REFUSALS_KEPT:
            self._refusals.popitem(last=False)
        raise refused

    # --- places ------------------------------------------------------------------------

    def _victim(self) -> Adapter | None:
        """The least recently used adapter that may be evicted: not pinned, no request
        in flight, none about to start."""
        idle = [a for a in self.registry.served()
                if not a.pinned and not a.in_flight and not self._pending[a.name]]
        return min(idle, key=lambda a: a.last_used, default=None)

    async def _install(self, name: str, weights: AdapterWeights, key: CacheKey | None,
                       source: str, seconds: float, pinned: bool) -> None:
        """Give a validated adapter a place (evicting one if need be) and load it; an
        on-demand load waits for a place, a pinned one is refused without one. An adapter
        of that name still leaving the engine is waited for."""
        while True:
            generation = self._places.generation
            present = self.registry.named(name)
            if present is not None and not present.leaving:
                raise AdapterError(f"an adapter named {name!r} is loaded already")
            if present is not None:
                await self._places.wait(generation)
                continue
            full = self.registry.places_taken >= self.registry.capacity
            victim = self._victim() if full else None
            if not full or victim:
                started = time.monotonic()
                await self._put(name, weights, key, pinned, victim)
                seconds += time.monotonic() - started
                self.events.loaded(name, source, seconds)
                logger.info("adapter %s loaded from %s in %.3f s", name, source, seconds)
                return
            if pinned:
                raise AdapterError(f"{self.registry.capacity} adapters are loaded, the "
                                   "most this server holds (--max-adapters), and none "
                                   "is idle; unload one first")
            if all(a.pinned and not a.retired for a in self.registry.holders()):
                raise AdapterError("every place is held by a pinned adapter "
                                   "(--max-adapters); unload one")
            await self._places.wait(generation)

    def _held(self, adapter: Adapter) -> EngineAdapter:
        return EngineAdapter(adapter.adapter_id, adapter.has_talan,
                             self._loras.get(adapter.adapter_id))

    async def _put(self, name: str, weights: AdapterWeights, key: CacheKey | None,
                   pinned: bool, victim: Adapter | None = None) -> None:
        """Load a validated adapter into a place: a free one, or ``victim``'s, evicted
        (into the host cache) in the same engine call. The place is taken before the
        first await."""
        adapter = self.registry.reserve(name, weights, key, pinned, evicting=victim)
        evicting = None
        if victim is not None:
            if victim.cache_key is not None:
                self.cache.put(victim.cache_key, victim.weights)
            evicting = self._held(victim)
        try:
            lora = await self.engine.load(name, adapter.adapter_id, weights, evicting)
        except BaseException:
            self.registry.drop(adapter)
            raise
        finally:
            if victim is not None:
                self._loras.pop(victim.adapter_id, None)
                self.registry.drop(victim)
                self.events.evicted(victim.name)
                logger.info("adapter %s evicted (least recently used)", victim.name)
            self._places.freed()
        if lora is not None:
            self._loras[adapter.adapter_id] = lora
        self.registry.publish(adapter)
        logger.debug("adapter %s: id %d, TALAN %s, LoRA rank %s", name, adapter.adapter_id,
                     weights.config.connection_point if weights.has_talan else "none",
                     weights.lora_rank)

    async def _remove(self, adapter: Adapter) -> None:
        """Unload a retired adapter from the engine and free its place."""
        try:
            await self.engine.unload(self._held(adapter))
        finally:
            self._loras.pop(adapter.adapter_id, None)
            self.registry.drop(adapter)
            self._places.freed()

    # --- explicit loads and unloads -----------------------------------------------------

    async def load(self, name: str, path: str | Path, within: Path | None = None) -> None:
        """Load the checkpoint at ``path`` as ``name``, pinned (``--adapters``,
        ``/v1/load_lora_adapter``); ``within``: the folder its files must stay in."""
        if name in self.registry.names():
            raise AdapterError(f"an adapter named {name!r} is loaded already")
        pinned = sum(a.pinned for a in self.registry.served())
        if self.directory is not None and pinned + 1 >= self.registry.capacity:
            raise AdapterError(f"{pinned} adapters are pinned: one more would leave no "
                               "place for --adapter-dir (--max-adapters "
                               f"{self.registry.capacity})")
        started = time.monotonic()
        try:
            weights, key, source = await self._weights(name, Path(path), within)
        except AdapterRefused as error:
            self.events.refused(error.reason)
            raise
        await self._install(name, weights, key, source, time.monotonic() - started, True)

    async def unload(self, name: str) -> None:
        while (present := self.registry.named(name)) is not None \
                and present.stage is Stage.LOADING:  # wait for the load
            await self._places.wait(self._places.generation)
        adapter = self.registry.retire(name)
        while adapter.in_flight:  # woken as its last request ends
            await self._places.wait(self._places.generation)
        await self._remove(adapter)
        logger.info("adapter %s unloaded", name)

    # --- requests ----------------------------------------------------------------------

    def offers(self, name: str) -> bool:
        """Whether ``name`` is served, loaded or on demand (``AdapterRefused`` for a name
        that --adapter-dir refuses)."""
        if self.registry.get(name) is not None:
            return True
        if self.directory is None:
            return False
        try:
            self.directory.entry(name)
        except ModelNotFoundError:
            return False
        except AdapterRefused as error:
            self.events.refused(error.reason)
            raise
        return True

    async def unloaded_entries(self) -> list[tuple[DirectoryEntry, Holds]]:
        """The on-demand entries there are now that are not loaded (nor shadowed by a
        loaded adapter of that name), with what each holds; listed off the event loop."""
        if self.directory is None:
            return []
        taken = {*self.registry.names(), self.base_name}
        return await asyncio.to_thread(self.directory.listing, taken)

    async def _bring(self, name: str) -> Adapter:
        """An adapter of --adapter-dir, loaded (once, however many ask at the same time)."""
        if self.directory is None:
            raise ModelNotFoundError(f"The model '{name}' does not exist")
        entry = self.directory.entry(name)
        if self._waiting >= self.queue_size:
            raise AdapterQueueFull(f"{self._waiting} requests are waiting for their adapter "
                                   "to be loaded, the most this server queues; retry later")
        self._waiting += 1
        self._pending[name] += 1
        try:
            while True:
                task = self._loads.get(name)
                if task is None:
                    task = asyncio.create_task(self._fetch(entry))
                    self._loads[name] = task
                    task.add_done_callback(lambda done: self._fetched(name, done))
                await asyncio.shield(task)
                adapter = self.registry.get(name)
                if adapter is not None:
                    return adapter
        finally:
            self._waiting -= 1
            self._pending[name] -= 1
            if not self._pending[name]:
                del self._pending[name]

    def _fetched(self, name: str, task: asyncio.Task) -> None:
        if self._loads.get(name) is task:
            del self._loads[name]
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have gone

    async def _fetch(self, entry: DirectoryEntry) -> None:
        started = time.monotonic()
        weights, key, source = await self._weights(entry.name, entry.path, entry.root)
        await self._install(entry.name, weights, key, source, time.monotonic() - started,
                            pinned=False)

    def route_of(self, adapter: Adapter, talan_enabled: bool) -> RequestRoute:
        lora = self._loras.get(adapter.adapter_id)
        if not (talan_enabled and adapter.has_talan):
            return RequestRoute(adapter, lora, switch_args(False))
        return RequestRoute(adapter, lora, switch_args(True, adapter.adapter_id))

    @asynccontextmanager
    async def serving(self, model: str | None, talan_enabled: bool
                      ) -> AsyncIterator[RequestRoute]:
        """The route of a request by its ``model`` while it runs: its adapter, loaded
        first if need be, counted in flight (never evicted meanwhile)."""
        if model is None or model == self.base_name:
            yield RequestRoute(None, None, switch_args(False))  # the base model alone
            return
        adapter = self.registry.get(model)
        if adapter is None:
            try:
                adapter = await self._bring(model)
            except AdapterRefused as error:
                self.events.refused(error.reason)
                raise
        self.events.request(model)
        adapter.in_flight += 1
        adapter.last_used = time.monotonic()
        try:
            yield self.route_of(adapter, talan_enabled)
        finally:
            adapter.in_flight -= 1
            adapter.last_used = time.monotonic()
            if not adapter.in_flight:
                self._places.freed()

    def loaded_count(self) -> int:
        return len(self.registry.served())


ONE_CHECKPOINT = ("this server serves one checkpoint; start it with --adapters (or "
                  "--talan-connection-points, or --adapter-dir) to load adapters")
