"""``TalanWorkerExtension.talan_change_adapters``: an eviction and a load in one call.

The parts it runs (TALAN blocks in the state layers, LoRAs in vLLM's cache) are run by
the server contract suite in a real engine (tests/contract/test_adapters_server.py); here
a stand-in worker records them, to show their order and that a failed load leaves nothing
of itself behind while the eviction stands.
"""

from __future__ import annotations

import pytest

from talan_serve.plugins.vllm.worker import TalanWorkerExtension


class RecordingWorker(TalanWorkerExtension):
    """The extension's own logic over parts that record what they are asked."""

    def __init__(self, refuse_lora: bool = False) -> None:
        self.calls: list[tuple[str, int]] = []
        self.refuse_lora = refuse_lora

    def talan_unload_adapter(self, adapter: int) -> None:
        self.calls.append(("unload talan", adapter))

    def remove_lora(self, lora_id: int) -> bool:
        self.calls.append(("remove lora", lora_id))
        return True

    def talan_add_adapter(self, adapter: int, config: dict, weights: bytes) -> None:
        self.calls.append(("add talan", adapter))

    def talan_add_lora(self, lora_id: int, config: dict, weights: bytes) -> None:
        if self.refuse_lora:
            raise ValueError("LoRA refused")
        self.calls.append(("add lora", lora_id))


def test_the_evicted_adapter_leaves_before_the_new_one_comes():
    worker = RecordingWorker()
    worker.talan_change_adapters([3, True, True], [7, [{}, b""], [{}, b""]])
    assert worker.calls == [("unload talan", 3), ("remove lora", 3), ("add talan", 7),
                            ("add lora", 7)]


def test_only_the_parts_an_adapter_has_are_touched():
    worker = RecordingWorker()
    worker.talan_change_adapters([3, False, True], [7, [{}, b""], None])
    worker.talan_change_adapters([7, True, False], None)
    assert worker.calls == [("remove lora", 3), ("add talan", 7), ("unload talan", 7)]


def test_a_failed_load_takes_its_talan_block_back_and_the_eviction_stands():
    worker = RecordingWorker(refuse_lora=True)
    with pytest.raises(ValueError, match="LoRA refused"):
        worker.talan_change_adapters([3, True, False], [7, [{}, b""], [{}, b""]])
    assert worker.calls == [("unload talan", 3), ("add talan", 7), ("unload talan", 7)]
