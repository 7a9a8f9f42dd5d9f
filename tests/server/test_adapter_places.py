"""``ServedAdapters`` on demand, against a stand-in engine (no engine, no HTTP).

The rules of ``--adapter-dir``, each shown by what the engine is asked to do: the least
recently used idle adapter is evicted, never one with a request in flight or about to
start, never a pinned one; a load with no place to take waits for a request to end; a
burst for one adapter loads it once; the requests waiting for their adapter are bounded;
an evicted adapter comes back from the host cache without its files being read, unless
they changed; a refused folder is not read again until it changes, and takes no place; a
server whose CUDA graphs hold the kinds of start refuses a later folder of another kind.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch

from server import adapters as adapters_module
from server.adapter_cache import AdapterCache
from server.adapter_dir import AdapterDirectory
from server.adapter_errors import AdapterError, AdapterQueueFull, AdapterRefused
from server.adapters import AdapterRegistry, OnDemand, ServedAdapters, size_adapters
from server.errors import adapter_queue_full
from talan_serve.adapter_files import AdapterWeights, BaseWeights
from talan_serve.adapter_spec import AdapterSetSpec
from talan_serve.block import TalanBlock
from talan_serve.checkpoint import WEIGHTS_NAME, save_checkpoint
from talan_serve.testing import reseal_checkpoint, tiny_talan_config

BASE = BaseWeights(hidden_size=128, num_layers=4, shapes={})


class StandInEngine:
    """Records what it is asked, and holds at most ``places`` adapters (as an engine
    sized for them does); a load may be held until ``gate`` is set."""

    def __init__(self, places: int) -> None:
        self.places = places
        self.calls: list[tuple[str, int]] = []
        self.held: set[int] = set()
        self.gate: asyncio.Event | None = None
        self.in_flight = self.most_in_flight = 0

    async def load(self, name, adapter_id, weights, evicting=None):
        assert not weights.has_lora, "TALAN-only adapters here"
        if evicting is not None:
            self.calls.append(("unload", evicting.adapter_id))
            self.held.remove(evicting.adapter_id)
        self.calls.append(("load", adapter_id))
        self.held.add(adapter_id)
        assert len(self.held) <= self.places, "more adapters than the engine holds"
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
        finally:
            self.in_flight -= 1
        return None

    async def unload(self, adapter) -> None:
        self.calls.append(("unload", adapter.adapter_id))
        self.held.remove(adapter.adapter_id)


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def loaded(self, name, source, seconds):
        self.seen.append(("loaded", name, source))

    def evicted(self, name):
        self.seen.append(("evicted", name))

    def refused(self, reason):
        self.seen.append(("refused", reason))

    def request(self, name):
        pass


@pytest.fixture
def library(tmp_path) -> Path:
    root = tmp_path / "library"
    for index, name in enumerate("abcd"):
        torch.manual_seed(index)
        save_checkpoint(root / name, "tiny", block=TalanBlock(tiny_talan_config()))
    return root


@pytest.fixture
def reads(monkeypatch) -> list[Path]:
    """Every checkpoint folder read from disk (``read_adapter`` calls)."""
    seen = []
    real = adapters_module.read_adapter

    def counted(path, base, within=None):
        seen.append(Path(path).name)
        return real(path, base, within)

    monkeypatch.setattr(adapters_module, "read_adapter", counted)
    return seen


def served(library: Path, places: int, queue: int = 8, cache: int = 2**20
           ) -> tuple[ServedAdapters, StandInEngine, Events]:
    spec = AdapterSetSpec.covering([tiny_talan_config()], 128, None, (), places)
    registry = AdapterRegistry(spec, BASE, places, None)
    engine, events = StandInEngine(places), Events()
    adapters = ServedAdapters(registry, engine, "tiny",
                              OnDemand(AdapterDirectory([library]), cache, queue))
    adapters.events = events
    return adapters, engine, events


async def until(condition, timeout_s: float = 30.0) -> None:
    """Wait for ``condition()`` (validation runs in a thread: its time varies with load)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met"
        await asyncio.sleep(0.005)


async def use(adapters: ServedAdapters, name: str) -> int:
    async with adapters.serving(name, True) as route:
        return route.adapter.adapter_id


def test_least_recently_used_idle_adapter_is_evicted_and_comes_back_from_the_cache(
        library, reads):
    async def run():
        adapters, engine, events = served(library, places=2)
        assert [await use(adapters, n) for n in ("a", "b", "a", "c")] == [1, 2, 1, 3]
        assert engine.calls == [("load", 1), ("load", 2), ("unload", 2), ("load", 3)]
        assert sorted(adapters.registry.names()) == ["a", "c"]
        assert await use(adapters, "b") == 4  # a new id: ids are never reused
        assert reads == ["a", "b", "c"]  # b came back from the cache
        assert events.seen[-2:] == [("evicted", "a"), ("loaded", "b", "cache")]

    asyncio.run(run())


def test_a_changed_folder_is_read_again(library, reads):
    async def run():
        adapters, _, events = served(library, places=1)
        await use(adapters, "a")
        await use(adapters, "b")
        config = json.loads((library / "a" / "talan_config.json").read_text())
        (library / "a" / "talan_config.json").write_text(json.dumps({**config, "alpha": 0.25}))
        reseal_checkpoint(library / "a")
        await use(adapters, "a")
        assert reads == ["a", "b", "a"]
        assert adapters.registry.get("a").weights.config.alpha == 0.25
        assert events.seen[-1] == ("loaded", "a", "disk")

    asyncio.run(run())


def test_an_adapter_in_flight_is_not_evicted_and_a_load_waits_for_a_place(library):
    async def run():
        adapters, engine, _ = served(library, places=2)
        done = {name: asyncio.Event() for name in "ab"}

        async def hold(name):
            async with adapters.serving(name, True):
                await done[name].wait()

        holders = []
        for name in "ab":  # one after the other, so that a gets id 1 and b id 2
            holders.append(asyncio.create_task(hold(name)))
            await until(lambda n=name: adapters.registry.get(n) is not None)
        waiting = asyncio.create_task(use(adapters, "c"))
        await until(lambda: adapters._places._waiters)  # c is validated, and has no place
        assert not waiting.done() and engine.calls == [("load", 1), ("load", 2)]
        done["b"].set()  # b's request ends: b, idle now, makes room; a is still in flight
        assert await waiting == 3
        assert engine.calls[-2:] == [("unload", 2), ("load", 3)]
        done["a"].set()
        await asyncio.gather(*holders)

    asyncio.run(run())


def test_loads_that_wait_together_reach_the_engine_together(library):
    """Two evictions and their loads are in flight at once (an engine serves them in one
    wait for a step), each into its own place; a request for an adapter still leaving
    waits for it to leave, then loads it again, and one for another waits for a place."""
    shutil.copytree(library / "a", library / "e")

    async def run():
        adapters, engine, events = served(library, places=2)
        for name in "ab":
            await use(adapters, name)
        engine.gate = asyncio.Event()
        loads = [asyncio.create_task(use(adapters, name)) for name in "cd"]
        await until(lambda: engine.in_flight == 2)
        assert sorted(engine.calls[2:]) == [("load", 3), ("load", 4), ("unload", 1),
                                            ("unload", 2)]
        back = asyncio.create_task(use(adapters, "a"))  # a is leaving: no place yet
        other = asyncio.create_task(use(adapters, "e"))  # every place is loading
        await asyncio.sleep(0.05)
        assert not back.done() and not other.done() and len(engine.calls) == 6
        engine.gate.set()
        assert sorted(await asyncio.gather(*loads)) == [3, 4]
        assert sorted([await back, await other]) == [5, 6]
        assert engine.most_in_flight == 2 and engine.held == {5, 6}
        assert events.seen.count(("evicted", "a")) == 1

    asyncio.run(run())


def test_one_name_is_loaded_once_and_waits_for_its_unload(library):
    """Two loads of one name at once: the second is refused (not left waiting); an
    unload during the load waits for it; a load of a name being unloaded waits for the
    unload, then gets a new id."""
    async def run():
        adapters, engine, _ = served(library, places=3)
        engine.gate = asyncio.Event()
        first = asyncio.create_task(adapters.load("x", library / "a"))
        await until(lambda: engine.in_flight == 1)
        with pytest.raises(AdapterError, match="'x' is loaded already"):
            await adapters.load("x", library / "b")
        early = asyncio.create_task(adapters.unload("x"))
        await asyncio.sleep(0.05)
        assert not early.done()
        engine.gate.set()
        await first
        await early
        assert engine.calls == [("load", 1), ("unload", 1)]
        engine.calls.clear()
        await adapters.load("x", library / "a")
        async with adapters.serving("x", True):
            unload = asyncio.create_task(adapters.unload("x"))
            await asyncio.sleep(0.01)
            again = asyncio.create_task(adapters.load("x", library / "b"))
            await asyncio.sleep(0.05)
            assert not again.done() and engine.calls == [("load", 2)]
        await unload
        await again
        assert engine.calls == [("load", 2), ("unload", 2), ("load", 3)]
        assert adapters.registry.get("x").adapter_id == 3

    asyncio.run(run())


def test_pinned_adapters_are_never_evicted(library):
    async def run():
        adapters, engine, _ = served(library, places=2)
        await adapters.load("pinned", library / "a")
        for name in ("b", "c", "d", "b"):
            await use(adapters, name)
        assert adapters.registry.get("pinned").pinned
        assert ("unload", 1) not in engine.calls
        with pytest.raises(AdapterError, match="leave no place for --adapter-dir"):
            await adapters.load("second", library / "b")

    asyncio.run(run())


def test_a_burst_for_one_adapter_loads_it_once(library, reads):
    async def run():
        adapters, engine, _ = served(library, places=2)
        engine.gate = asyncio.Event()
        burst = [asyncio.create_task(use(adapters, "a")) for _ in range(5)]
        await asyncio.sleep(0.05)
        engine.gate.set()
        assert await asyncio.gather(*burst) == [1] * 5
        assert engine.calls == [("load", 1)] and reads == ["a"]

    asyncio.run(run())


def test_requests_waiting_for_their_adapter_are_bounded(library):
    async def run():
        adapters, _, _ = served(library, places=1, queue=2)
        async with adapters.serving("a", True):
            waiting = [asyncio.create_task(use(adapters, n)) for n in ("b", "c")]
            await asyncio.sleep(0.05)
            with pytest.raises(AdapterQueueFull, match="2 requests are waiting") as full:
                await use(adapters, "d")
            answer = adapter_queue_full(full.value)  # what the client gets, as the rest 429
            assert (answer.status, answer.headers) == (429, {"Retry-After": "1"})
            assert answer.body()["error"]["code"] == "adapter_queue_full"
            waiting[1].cancel()  # a client that leaves gives its place in the queue back
            await asyncio.sleep(0.05)
            assert adapters._waiting == 1
            late = asyncio.create_task(use(adapters, "c"))
            await asyncio.sleep(0.05)
        assert sorted([await waiting[0], await late]) == [2, 3]

    asyncio.run(run())


def test_a_refused_folder_takes_no_place_and_is_not_read_again(library, reads):
    async def run():
        adapters, engine, events = served(library, places=1)
        await use(adapters, "a")
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(library / "b" / WEIGHTS_NAME))
        tensors[sorted(tensors)[0]].view(-1)[0] = float("nan")
        save_file(tensors, str(library / "b" / WEIGHTS_NAME))
        reseal_checkpoint(library / "b")
        for _ in range(2):
            with pytest.raises(AdapterRefused, match="is not finite") as error:
                await use(adapters, "b")
            assert (error.value.status, error.value.reason) == (400, "checkpoint")
        assert reads == ["a", "b"]  # the refusal is remembered while the folder is unchanged
        assert engine.calls == [("load", 1)] and adapters.registry.names() == ["a"]
        assert events.seen.count(("refused", "checkpoint")) == 2
        for bad, reason in (("/".join(("..", "a")), "name"), ("e", None)):
            with pytest.raises(AdapterRefused if reason else LookupError):
                await use(adapters, bad)

    asyncio.run(run())


def test_with_kinds_fixed_at_start_a_later_folder_of_a_new_kind_is_refused_by_name(
        library, tmp_path):
    """A server that captures its decode steps in CUDA graphs (stood in for by
    ``kinds_fixed``: no CUDA here) builds at start the kinds of the folders there are then;
    a folder of another kind that appears later is refused with a 400 that names it and
    the kinds there are, takes no place and reaches no engine, while the others serve."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"hidden_size": 128,
                                                  "num_hidden_layers": 4}))
    save_checkpoint(library / "mix", "tiny", block=TalanBlock(
        tiny_talan_config(network_type="per_token_mix")))
    sizing = size_adapters(base, {}, 2, None, (), None, kinds_fixed=True,
                           directory=AdapterDirectory([library]))
    assert len(sizing.spec.kinds) == 2  # a to d, and mix
    save_checkpoint(library / "late", "tiny", block=TalanBlock(
        tiny_talan_config(network_type="cross_attn")))
    engine, events = StandInEngine(2), Events()
    adapters = ServedAdapters(sizing.registry, engine, "tiny",
                              OnDemand(AdapterDirectory([library]), 2**20, 8))
    adapters.events = events

    async def run():
        assert [await use(adapters, name) for name in ("a", "mix")] == [1, 2]
        with pytest.raises(AdapterRefused) as refused:
            await use(adapters, "late")
        assert (refused.value.status, refused.value.reason) == (400, "unfit")
        assert str(refused.value).startswith(
            "adapter 'late': an adapter of kind cross_attn/attention/learned_gate at "
            "layer_1 cannot join: this server captures its decode steps in CUDA graphs")
        assert "multihead_local/attention/learned_gate at layer_1" in str(refused.value)
        assert engine.calls == [("load", 1), ("load", 2)]
        assert sorted(adapters.registry.names()) == ["a", "mix"]
        assert await use(adapters, "b") == 3  # the others still load, evicting as usual
        assert ("refused", "unfit") in events.seen

    asyncio.run(run())


def test_the_cache_keeps_the_most_recent_within_its_bytes(library):
    from talan_serve.adapter_files import read_adapter

    weights = {name: read_adapter(library / name, BASE) for name in "abc"}
    size = weights["a"].nbytes
    cache = AdapterCache(2 * size + 1)
    keys = {name: AdapterCache.key(library / name) for name in "abc"}
    for name in "abc":
        cache.put(keys[name], weights[name])
    assert (len(cache), cache.nbytes) == (2, 2 * size)
    assert cache.take(keys["a"]) is None  # the oldest went first
    assert cache.take(keys["c"]) is weights["c"] and cache.nbytes == size
    too_big = AdapterWeights(library / "d", "tiny", None, bytes(2 * size + 2), None, None,
                             None)
    cache.put(AdapterCache.key(library / "d"), too_big)
    assert len(cache) == 1 and cache.nbytes == size


def test_unload_waits_for_the_requests_in_flight(library):
    async def run():
        adapters, engine, _ = served(library, places=2)
        await adapters.load("a", library / "a")
        async with adapters.serving("a", True):
            unload = asyncio.create_task(adapters.unload("a"))
            await asyncio.sleep(0.05)
            assert not unload.done() and ("unload", 1) not in engine.calls
            assert adapters.registry.get("a") is None  # no new request is routed to it
        await asyncio.wait_for(unload, 5)
        assert engine.calls == [("load", 1), ("unload", 1)]
        assert "a" not in adapters.registry.names()

    asyncio.run(run())


def test_the_listing_reads_only_manifests_that_changed(library, monkeypatch):
    """/v1/models lists every folder with what it holds; a second listing reads no
    manifest that has not changed, and sees one that has."""
    from server import adapter_dir
    from talan_serve.checkpoint import MANIFEST_NAME

    read = []
    real = adapter_dir.read_manifest
    monkeypatch.setattr(adapter_dir, "read_manifest",
                        lambda path: read.append(Path(path).name) or real(path))
    adapters, _, _ = served(library, places=2)
    asyncio.run(use(adapters, "a"))

    def listing():
        return {e.name: holds for e, holds in asyncio.run(adapters.unloaded_entries())}

    assert listing() == {name: (True, False) for name in "bcd"}  # "a" is loaded
    assert sorted(read) == ["b", "c", "d"]
    read.clear()
    assert listing() == {name: (True, False) for name in "bcd"} and read == []
    manifest = library / "c" / MANIFEST_NAME
    manifest.write_text(manifest.read_text().replace("{", "{ ", 1))  # another size
    (library / "d" / MANIFEST_NAME).write_text("not JSON")
    assert listing() == {"b": (True, False), "c": (True, False), "d": (None, None)}
    assert sorted(read) == ["c", "d"]
