"""How the SGLang backend asks its engine for a load, with the engine's three calls
stood in for (recorders; SGLang's own answers are in tests/contract/test_adapters_server.py,
which serves a library through the real engine): the TALAN part (one change of a
scheduler call, an eviction's removal with it) and the LoRA part (the tokenizer manager's)
go at once, so that the scheduler serves them in the same gap between steps; when either
fails, nothing of the new adapter stays. An evicted adapter's LoRA stays loaded while its
weights live (the front end's host cache keeps them), and a load of those weights reuses
it. TALAN changes asked for while a scheduler call is under way go together in the next
call.
"""

from __future__ import annotations

import asyncio
import gc
import json
from types import SimpleNamespace

import pytest

from server.adapter_errors import AdapterError
from server.adapters import EngineAdapter
from server.backends.sglang import SglangBackend
from server.backends.sglang_loras import ResidentLoras
from talan_serve.plugins.sglang.rpc import FAILED_CHANGES

APPLY = "talan_apply_changes"

NEW, OLD = 7, 3
CONFIG = {"n_themes": 4}


class Weights:
    """Validated weights as the backend sees them (held weakly by its record of LoRAs)."""

    def __init__(self, talan: bool, lora: bool):
        self.has_talan, self.has_lora, self.talan_file = talan, lora, b"talan"
        self.config = SimpleNamespace(to_dict=lambda: CONFIG)


def weights(talan: bool = True, lora: bool = True) -> Weights:
    return Weights(talan, lora)


class Calls:
    """The backend's engine calls, recorded in the order they start; ``fail`` names the
    ones that raise (``talan_apply_changes`` as the engine does: by change, with the
    others applied). The TALAN call ends only once the LoRA load has started: were the
    parts one after the other, a load would wait forever (the test's timeout)."""

    def __init__(self, backend: SglangBackend, fail: tuple[str, ...] = ()):
        self.log: list[tuple] = []
        self.fail = fail
        self.lora_started = asyncio.Event()
        backend._rpc = self.rpc
        backend._load_lora = self.load_lora
        backend._unload_lora = self.unload_lora

    async def rpc(self, method: str, changes: list) -> None:
        self.log.append((method, changes))
        if any(add is not None for _, add in changes):
            await self.lora_started.wait()
        if method in self.fail:
            raise AdapterError(json.dumps({FAILED_CHANGES: {
                index: f"change {index} failed" for index, (_, add) in enumerate(changes)
                if add is not None}}))

    async def load_lora(self, name: str, handle: str, weights) -> str:
        self.log.append(("load_lora", handle))
        self.lora_started.set()
        await asyncio.sleep(0)
        if "load_lora" in self.fail:
            raise AdapterError("SGLang refused its LoRA")
        return handle

    async def unload_lora(self, handle: str) -> None:
        self.log.append(("unload_lora", handle))

    def in_any_order(self) -> list[tuple]:
        """The calls by name: those that go at once may start in either order."""
        return sorted(self.log, key=lambda call: call[0])


def run(backend: SglangBackend, call):
    """Run one engine call of ``backend``, then the LoRA unloads it leaves running."""
    async def call_and_sweeps():
        result = await asyncio.wait_for(call, timeout=5)
        await asyncio.gather(*backend._sweeps)
        return result

    return asyncio.run(call_and_sweeps())


@pytest.fixture
def backend() -> SglangBackend:
    backend = SglangBackend.__new__(SglangBackend)  # no engine: its calls are recorded
    backend._resident, backend._sweeps = ResidentLoras(), set()
    backend._changes, backend._sender = [], None
    return backend


def test_an_eviction_and_its_load_go_to_the_engine_at_once(backend):
    calls = Calls(backend)
    handle = run(backend, backend.load("new", NEW, weights(), EngineAdapter(OLD, True, "old")))
    assert handle == "new#0"
    # The evicted adapter's LoRA stays loaded: its weights may come back from the cache.
    assert calls.in_any_order() == [
        ("load_lora", "new#0"),
        (APPLY, [[OLD, [NEW, CONFIG, b"talan"]]]),
    ]


def test_a_load_of_cached_weights_reuses_their_lora(backend):
    calls = Calls(backend)
    cached = weights()
    first = run(backend, backend.load("new", NEW, cached))
    calls.log.clear()
    calls.lora_started.set()  # no LoRA part to wait for
    # Evicted (its weights into the cache), then asked for again: the same weights.
    again = run(backend, backend.load("new", NEW + 1, cached, EngineAdapter(NEW, True, first)))
    assert again == first
    assert calls.log == [(APPLY, [[NEW, [NEW + 1, CONFIG, b"talan"]]])]


def test_a_lora_whose_weights_are_gone_is_unloaded_after_the_next_load(backend):
    calls = Calls(backend)
    dropped = weights()
    first = run(backend, backend.load("old", OLD, dropped))
    del dropped  # evicted, and dropped from the host cache (or never cached)
    gc.collect()
    calls.log.clear()
    run(backend, backend.load("new", NEW, weights(), EngineAdapter(OLD, True, first)))
    assert calls.in_any_order() == [("load_lora", "new#1"),
                                    (APPLY, [[OLD, [NEW, CONFIG, b"talan"]]]),
                                    ("unload_lora", first)]
    assert len(backend._resident) == 1


def test_a_changed_folder_loads_a_new_lora_beside_the_old(backend):
    calls = Calls(backend)
    run(backend, backend.load("new", NEW, weights()))
    # The same name, other weights (the folder changed): a LoRA of its own.
    assert run(backend, backend.load("new", NEW + 1, weights(), EngineAdapter(NEW, True,
                                                                              "new#0"))) \
        == "new#1"
    assert ("load_lora", "new#1") in calls.log


def test_a_refused_lora_takes_the_talan_block_back(backend):
    calls = Calls(backend, fail=("load_lora",))
    with pytest.raises(AdapterError, match="refused its LoRA"):
        run(backend, backend.load("new", NEW, weights()))
    assert calls.log[-1] == (APPLY, [[NEW, None]])
    assert ("unload_lora", "new#0") not in calls.log
    assert len(backend._resident) == 0


def test_a_refused_talan_block_takes_the_lora_back(backend):
    calls = Calls(backend, fail=(APPLY,))
    with pytest.raises(AdapterError, match="change 0 failed"):
        run(backend, backend.load("new", NEW, weights()))
    assert calls.log[-1] == ("unload_lora", "new#0")
    assert (APPLY, [[NEW, None]]) not in calls.log
    assert len(backend._resident) == 0


def test_an_adapter_of_one_part_makes_one_call(backend):
    calls = Calls(backend)
    calls.lora_started.set()  # no LoRA part to wait for
    assert run(backend, backend.load("new", NEW, weights(lora=False))) is None
    assert calls.log == [(APPLY, [[None, [NEW, CONFIG, b"talan"]]])]
    calls.log.clear()
    assert run(backend, backend.load("lora-only", NEW, weights(talan=False))) == "lora-only#0"
    assert calls.log == [("load_lora", "lora-only#0")]


def test_an_unload_sends_both_parts_at_once(backend):
    calls = Calls(backend)
    kept = weights()
    handle = run(backend, backend.load("old", OLD, kept))
    calls.log.clear()
    run(backend, backend.unload(EngineAdapter(OLD, True, handle)))
    assert calls.in_any_order() == [(APPLY, [[OLD, None]]), ("unload_lora", handle)]
    assert backend._resident.find(kept) is None  # an unloaded LoRA is not reused


def test_a_refused_talan_block_leaves_a_reused_lora_loaded(backend):
    calls = Calls(backend)
    cached = weights()
    handle = run(backend, backend.load("new", NEW, cached))
    calls.fail, calls.log = (APPLY,), []
    calls.lora_started.set()
    with pytest.raises(AdapterError, match="change 0 failed"):
        run(backend, backend.load("new", NEW + 1, cached))
    assert ("unload_lora", handle) not in calls.log
    assert backend._resident.find(cached) == handle


def test_changes_asked_for_during_a_call_go_together_in_the_next(backend):
    """A load's change goes alone; two more, asked for while its call is under way, go
    together in the next call; a change the engine refuses fails its own load only."""
    calls = Calls(backend)
    under_way, release = asyncio.Event(), asyncio.Event()

    async def rpc(method: str, changes: list) -> None:
        calls.log.append((method, changes))
        if len(calls.log) == 1:
            under_way.set()
            await release.wait()  # until the other two are asked for
        elif len(changes) == 2:
            raise AdapterError(json.dumps({FAILED_CHANGES: {"1": "no room"}}))

    backend._rpc = rpc

    async def loads():
        first = asyncio.create_task(backend.load("a1", 1, weights(lora=False)))
        await under_way.wait()
        later = [asyncio.create_task(backend.load(f"a{i}", i, weights(lora=False)))
                 for i in (2, 3)]
        await asyncio.sleep(0)
        release.set()
        return await asyncio.gather(first, *later, return_exceptions=True)

    loaded = run(backend, loads())
    assert calls.log == [(APPLY, [[None, [1, CONFIG, b"talan"]]]),
                         (APPLY, [[None, [2, CONFIG, b"talan"]], [None, [3, CONFIG, b"talan"]]])]
    assert loaded[:2] == [None, None]
    assert isinstance(loaded[2], AdapterError) and str(loaded[2]) == "no room"


def test_a_call_that_fails_as_a_whole_fails_each_load_waiting_on_it(backend):
    calls = Calls(backend)
    calls.lora_started.set()

    async def engine_gone(method: str, changes: list) -> None:
        calls.log.append((method, changes))
        raise ConnectionError("the scheduler is gone")

    backend._rpc = engine_gone

    async def two_loads():
        loads = [backend.load(f"a{i}", i, weights(lora=False)) for i in (1, 2)]
        return await asyncio.gather(*loads, return_exceptions=True)

    assert [str(error) for error in run(backend, two_loads())] == ["the scheduler is gone"] * 2
    assert len(calls.log) == 1  # the two changes went in one call
