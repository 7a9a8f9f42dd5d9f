"""The per-request off switch inside vLLM: a logits processor that only reads flags.

vLLM hands a request's ``SamplingParams`` to the worker only through the persistent
input batch, and the one public hook on it is the V1 logits-processor interface: its
``update_state`` sees every request added to, removed from or moved within the batch,
by batch row, before each forward pass (the row order the model sees: the TALAN state
metadata keeps the input batch's order). ``TalanSwitch`` is such a processor that never
changes logits; it parses each row's ``extra_args`` with ``talan_serve.switch`` and
mirrors the flag into the TALAN layers' ``enabled_rows`` buffers (fixed addresses, so
CUDA graphs read the current flags on replay). The model's config hook adds this
processor for TALAN architectures only.
"""

from __future__ import annotations

from typing import Any

import torch

from talan_serve.plugins.vllm._compat import LogitsProcessor, MoveDirectionality
from talan_serve.switch import enabled_in


def request_enabled(params: Any) -> bool:
    """TALAN on/off for a request's SamplingParams (raises ``SwitchError`` if malformed)."""
    return enabled_in(getattr(params, "extra_args", None))


class TalanSwitch(LogitsProcessor):
    """Logits processor that only tracks TALAN on/off per batch row (logits unchanged)."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        self.rows = torch.ones(vllm_config.scheduler_config.max_num_seqs, dtype=torch.bool)
        self.size = 0
        # The TALAN layers register in this config's forward context when the model is
        # built, which is after the input batch (and this processor) is.
        self._forward_context = vllm_config.compilation_config.static_forward_context
        self._layers: list[Any] | None = None

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        request_enabled(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def layers(self) -> list[Any]:
        if self._layers is None:
            from talan_serve.plugins.vllm.layer import TalanStateLayer

            self._layers = [layer for layer in self._forward_context.values()
                            if isinstance(layer, TalanStateLayer)]
        return self._layers

    def update_state(self, batch_update: Any) -> None:
        if not batch_update:
            return
        rows = self.rows
        for index in batch_update.removed:
            rows[index] = True
        for index, params, _, _ in batch_update.added:
            rows[index] = request_enabled(params)
        for src, dst, direction in batch_update.moved:
            src_flag, dst_flag = bool(rows[src]), bool(rows[dst])
            rows[dst] = src_flag
            rows[src] = dst_flag if direction == MoveDirectionality.SWAP else True
        self.size = size = batch_update.batch_size
        # Known on the host, so the layer can skip work that the flags make moot without a
        # device sync: the side path for a batch of TALAN-off requests, the per-row masking
        # for a batch of TALAN-on ones (CUDA graphs capture the masked path and read
        # enabled_rows on replay, with the same result).
        any_enabled, all_enabled = bool(rows[:size].any()), bool(rows[:size].all())
        for layer in self.layers():
            layer.enabled_rows[:size].copy_(rows[:size], non_blocking=True)
            layer.any_enabled, layer.all_enabled = any_enabled, all_enabled
