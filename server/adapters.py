"""The named TALAN adapters of a server with many on one base model.

The front end's half of multi-adapter serving (the engine's half is
``talan_serve.adapters``): names to engine adapter ids, what a new checkpoint must fit,
the allowlist for loading at run time, and the in-flight count that lets an unload wait
for its adapter's last request. Ids are never reused, so neither a late request nor a
prefix-cache entry of an unloaded adapter can reach another one.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from talan_serve.adapters import AdapterSetError, AdapterSetSpec
from talan_serve.checkpoint import CheckpointError, TalanCheckpoint, load_checkpoint

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
                 max_lora_rank: int | None):
        self.spec = spec
        self.num_layers = num_layers
        self.capacity = capacity
        self.max_lora_rank = max_lora_rank
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
                self.spec.check(checkpoint.config)
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
