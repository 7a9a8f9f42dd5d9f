"""A host-memory cache of evicted adapters, bounded in bytes, least recently used first out.

An adapter evicted to make room keeps its validated weights (its files' bytes) here,
under its folder and that folder's fingerprint (each file's size, modification time and
inode: metadata only), so that its next load skips the disk and the validation; a folder
that changed since is read and validated again. ``--adapter-cache-bytes`` bounds it (0:
no cache).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

from talan_serve.adapter_files import AdapterWeights

Fingerprint = tuple[tuple[str, int, int, int], ...]


def fingerprint(path: Path) -> Fingerprint:
    """What changes when a checkpoint folder's files change, from their metadata."""
    root = Path(os.path.realpath(path))
    entries = [(".", *_stat(root))]
    for child in sorted(root.iterdir()):
        entries.append((child.name, *_stat(child)))
    return tuple(entries)


def _stat(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return (stat.st_size, stat.st_mtime_ns, stat.st_ino)


CacheKey = tuple[str, Fingerprint]


class AdapterCache:
    """Validated adapters by (resolved folder, fingerprint), at most ``capacity`` bytes."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[CacheKey, AdapterWeights] = OrderedDict()
        self.nbytes = 0

    @staticmethod
    def key(path: Path) -> CacheKey:
        return (os.path.realpath(path), fingerprint(path))

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: CacheKey, weights: AdapterWeights) -> None:
        """Keep ``weights``, dropping the least recently used entries to make room; one
        larger than the whole cache is not kept."""
        self.take(key)
        size = weights.nbytes
        if size > self.capacity:
            return
        while self.nbytes + size > self.capacity:
            _, dropped = self._entries.popitem(last=False)
            self.nbytes -= dropped.nbytes
        self._entries[key] = weights
        self.nbytes += size

    def take(self, key: CacheKey) -> AdapterWeights | None:
        """The entry under ``key``, out of the cache (it is being loaded), or None."""
        weights = self._entries.pop(key, None)
        if weights is not None:
            self.nbytes -= weights.nbytes
        return weights
