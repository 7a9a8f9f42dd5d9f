"""The LoRAs a server of many adapters keeps loaded in SGLang, beyond its places.

SGLang's tokenizer manager takes LoRA loads and unloads one at a time, each a round trip
to the scheduler served between two steps, so a library whose places turn over would
queue its loads behind each other's LoRA updates. SGLang itself serves more loaded LoRAs
than its memory pool has slots (it fills a slot when a batch first needs one), so an
evicted adapter's LoRA stays loaded for as long as its validated weights live: in the
front end's host cache, from which its next load takes the same weights object. That load
then only changes the TALAN block. Once the weights are gone (dropped from the cache, or
never cached), the LoRA can never be asked for again and is unloaded after the next
load.
"""

from __future__ import annotations

import itertools
import weakref

from talan_serve.adapter_files import AdapterWeights


class ResidentLoras:
    """SGLang's LoRA handles by the weights each was loaded from (held weakly)."""

    def __init__(self) -> None:
        self._weights: dict[str, weakref.ref[AdapterWeights]] = {}
        self._serial = itertools.count()

    def __len__(self) -> int:
        return len(self._weights)

    def find(self, weights: AdapterWeights) -> str | None:
        """The handle of a LoRA loaded from these very weights, if one is still loaded."""
        for handle, ref in self._weights.items():
            if ref() is weights:
                return handle
        return None

    def new_handle(self, name: str) -> str:
        """A name for a new LoRA of adapter ``name``, never used before: a LoRA of an
        earlier version of its folder may still be loaded."""
        return f"{name}#{next(self._serial)}"

    def add(self, handle: str, weights: AdapterWeights) -> None:
        self._weights[handle] = weakref.ref(weights)

    def discard(self, handle: str) -> None:
        self._weights.pop(handle, None)

    def orphans(self) -> list[str]:
        """The handles whose weights are gone, out of the record (to be unloaded)."""
        gone = [handle for handle, ref in self._weights.items() if ref() is None]
        for handle in gone:
            del self._weights[handle]
        return gone
