"""How the SGLang backend asks its engine for a load, with the engine's three calls
stood in for (recorders; SGLang's own answers are in tests/contract/test_adapters_server.py,
which serves a library through the real engine): the TALAN part (one scheduler call, an
eviction's removal with it) and the LoRA part (the tokenizer manager's) go at once, so that
the scheduler serves them in the same gap between steps; when either fails, nothing of
the new adapter stays.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from server.adapter_errors import AdapterError
from server.adapters import EngineAdapter
from server.backends.sglang import SglangBackend

NEW, OLD = 7, 3
CONFIG = {"n_themes": 4}


def weights(talan: bool = True, lora: bool = True) -> SimpleNamespace:
    return SimpleNamespace(has_talan=talan, has_lora=lora, talan_file=b"talan",
                           config=SimpleNamespace(to_dict=lambda: CONFIG))


class Calls:
    """The backend's engine calls, recorded in the order they start; ``fail`` names the
    ones that raise. The TALAN call ends only once the LoRA load has started: were the
    parts one after the other, a load would wait forever (the test's timeout)."""

    def __init__(self, backend: SglangBackend, fail: tuple[str, ...] = ()):
        self.log: list[tuple] = []
        self.fail = fail
        self.lora_started = asyncio.Event()
        backend._rpc = self.rpc
        backend._load_lora = self.load_lora
        backend._unload_lora = self.unload_lora

    async def rpc(self, method: str, **kwargs) -> None:
        self.log.append((method, kwargs))
        if method == "talan_change_adapters":
            await self.lora_started.wait()
        if method in self.fail:
            raise AdapterError(f"{method} failed")

    async def load_lora(self, name: str, weights) -> str:
        self.log.append(("load_lora", name))
        self.lora_started.set()
        await asyncio.sleep(0)
        if "load_lora" in self.fail:
            raise AdapterError("SGLang refused its LoRA")
        return name

    async def unload_lora(self, handle: str) -> None:
        self.log.append(("unload_lora", handle))


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, timeout=5))


@pytest.fixture
def backend() -> SglangBackend:
    return SglangBackend.__new__(SglangBackend)  # no engine: its calls are recorded


def test_an_eviction_and_its_load_go_to_the_engine_at_once(backend):
    calls = Calls(backend)
    handle = run(backend.load("new", NEW, weights(), EngineAdapter(OLD, True, "old")))
    assert handle == "new"
    assert calls.log == [
        ("talan_change_adapters", {"remove": OLD, "add": [NEW, CONFIG, b"talan"]}),
        ("unload_lora", "old"),
        ("load_lora", "new"),
    ]


def test_a_refused_lora_takes_the_talan_block_back(backend):
    calls = Calls(backend, fail=("load_lora",))
    with pytest.raises(AdapterError, match="refused its LoRA"):
        run(backend.load("new", NEW, weights()))
    assert calls.log[-1] == ("talan_unload_adapter", {"adapter": NEW})
    assert ("unload_lora", "new") not in calls.log


def test_a_refused_talan_block_takes_the_lora_back(backend):
    calls = Calls(backend, fail=("talan_change_adapters",))
    with pytest.raises(AdapterError, match="talan_change_adapters failed"):
        run(backend.load("new", NEW, weights()))
    assert calls.log[-1] == ("unload_lora", "new")
    assert ("talan_unload_adapter", {"adapter": NEW}) not in calls.log


def test_an_adapter_of_one_part_makes_one_call(backend):
    calls = Calls(backend)
    calls.lora_started.set()  # no LoRA part to wait for
    assert run(backend.load("new", NEW, weights(lora=False))) is None
    assert calls.log == [("talan_change_adapters",
                          {"remove": None, "add": [NEW, CONFIG, b"talan"]})]
    calls.log.clear()
    assert run(backend.load("lora-only", NEW, weights(talan=False))) == "lora-only"
    assert calls.log == [("load_lora", "lora-only")]


def test_an_unload_sends_both_parts_at_once(backend):
    calls = Calls(backend)
    run(backend.unload(EngineAdapter(OLD, True, "old")))
    assert calls.log == [("talan_unload_adapter", {"adapter": OLD}), ("unload_lora", "old")]
