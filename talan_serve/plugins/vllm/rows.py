"""Each batch row's adapter id inside vLLM: a logits processor that only reads the switch.

vLLM hands a request's ``SamplingParams`` to the worker only through the persistent
input batch, and the one public hook on it is the V1 logits-processor interface: its
``update_state`` sees every request added to, removed from or moved within the batch,
by batch row, before each forward pass (the row order the model sees: the TALAN state
metadata keeps the input batch's order). ``RowAdapterTracker`` is such a processor that
never changes logits; it reads each row's ``extra_args`` (``talan_serve.engine.requests``)
into the adapter id the row runs (``NO_ADAPTER`` when TALAN is off) and hands the rows to
the TALAN layers (on the CPU for the step's plan, and into a fixed-address buffer that
CUDA graphs read on replay). The model's config hook adds this processor for TALAN
architectures only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from talan_serve.engine.requests import request_adapter
from talan_serve.plugins.vllm._compat import ARGS_FIELD, LogitsProcessor, MoveDirectionality
from talan_serve.switch import NO_ADAPTER


def row_adapter(params: Any) -> int:
    """The adapter id a request's SamplingParams run, or ``NO_ADAPTER`` (``SwitchError`` if
    malformed)."""
    return request_adapter(params, ARGS_FIELD)


class RowAdapterTracker(LogitsProcessor):
    """Logits processor that only tracks each batch row's adapter id (logits unchanged)."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        self.rows = np.full(vllm_config.scheduler_config.max_num_seqs, NO_ADAPTER,
                            dtype=np.int64)
        self.size = 0
        # The TALAN layers register in this config's forward context when the model is
        # built, which is after the input batch (and this processor) is.
        self._forward_context = vllm_config.compilation_config.static_forward_context
        self._layers: list[Any] | None = None

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        row_adapter(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def layers(self) -> list[Any]:
        if self._layers is None:
            from talan_serve.plugins.vllm.layer import VllmStateLayer

            self._layers = [layer for layer in self._forward_context.values()
                            if isinstance(layer, VllmStateLayer)]
        return self._layers

    def update_state(self, batch_update: Any) -> None:
        if not batch_update:
            return
        rows = self.rows
        for index in batch_update.removed:
            rows[index] = NO_ADAPTER
        for index, params, _, _ in batch_update.added:
            rows[index] = row_adapter(params)
        for src, dst, direction in batch_update.moved:
            src_adapter, dst_adapter = rows[src], rows[dst]
            rows[dst] = src_adapter
            rows[src] = dst_adapter if direction == MoveDirectionality.SWAP else NO_ADAPTER
        self.size = size = batch_update.batch_size
        for layer in self.layers():
            layer.set_row_adapters(rows[:size])
