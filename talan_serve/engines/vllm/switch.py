"""The per-request off switch: ``SamplingParams(extra_args={"talan": {"enabled": False}})``.

vLLM hands a request's ``SamplingParams`` to the worker only through the persistent
input batch, and the one public hook on it is the V1 logits-processor interface: its
``update_state`` sees every request added to, removed from or moved within the batch,
by batch row, before each forward pass (the row order the model sees: the TALAN
layer's metadata keeps the input batch's order). ``TalanSwitch`` is such a processor
that never changes logits; it mirrors each row's flag into the TALAN layer's
``enabled_rows`` buffer (a fixed address, so CUDA graphs read the current flags on
replay). The layer then leaves a disabled request's hidden states and state untouched,
which is exactly the adapter-only model. The model's config hook adds this processor
for TALAN architectures only.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from talan_serve.engines.vllm import _compat

EXTRA_ARGS_KEY = "talan"

_LAYERS: weakref.WeakSet = weakref.WeakSet()


def talan_extra_args(enabled: bool = True) -> dict[str, Any]:
    """The ``SamplingParams.extra_args`` that switch TALAN on or off for one request."""
    return {EXTRA_ARGS_KEY: {"enabled": bool(enabled)}}


def request_enabled(params: Any) -> bool:
    """TALAN on/off for a request's SamplingParams (on unless explicitly disabled)."""
    extra = getattr(params, "extra_args", None) or {}
    options = extra.get(EXTRA_ARGS_KEY)
    if options is None:
        return True
    if not isinstance(options, dict) or set(options) - {"enabled"}:
        raise ValueError(
            'talan-serve: extra_args["talan"] must be {"enabled": true|false}, '
            f"got {options!r}"
        )
    enabled = options.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ValueError(
            f'talan-serve: extra_args["talan"]["enabled"] must be a boolean, got {enabled!r}'
        )
    return enabled


def register_layer(layer: torch.nn.Module) -> None:
    """Called by each TALAN state layer; its ``enabled_rows`` follows the batch."""
    _LAYERS.add(layer)


class TalanSwitch(_compat.logits_processor_base()):
    """Logits processor that only tracks TALAN on/off per batch row (logits unchanged)."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        max_num_reqs = vllm_config.scheduler_config.max_num_seqs
        self.rows = torch.ones(max_num_reqs, dtype=torch.bool)
        self.size = 0

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        request_enabled(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: Any) -> None:
        if not batch_update:
            return
        swap = _compat.move_directionality().SWAP
        rows = self.rows
        for index in batch_update.removed:
            rows[index] = True
        for index, params, _, _ in batch_update.added:
            rows[index] = request_enabled(params)
        for src, dst, direction in batch_update.moved:
            src_flag, dst_flag = bool(rows[src]), bool(rows[dst])
            rows[dst] = src_flag
            rows[src] = dst_flag if direction == swap else True
        self.size = batch_update.batch_size
        # Known on the host, so the layer can skip work that the flags make moot without a
        # device sync: the side path for a batch of TALAN-off requests, the per-row masking
        # for a batch of TALAN-on ones (CUDA graphs capture the masked path and read
        # enabled_rows on replay, with the same result).
        any_enabled, all_enabled = bool(rows[: self.size].any()), bool(rows[: self.size].all())
        for layer in list(_LAYERS):
            buffer = layer.enabled_rows
            buffer[: self.size].copy_(rows[: self.size], non_blocking=True)
            layer.any_enabled, layer.all_enabled = any_enabled, all_enabled
