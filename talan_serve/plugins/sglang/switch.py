"""The per-request switch inside SGLang: ``custom_params = {"talan": {"enabled": false}}``.

SGLang carries a request's ``custom_params`` to the scheduler's ``Req``, not into the
forward, so hooks (SGLang's ``HookRegistry``, registered in every process) do the rest,
each reading the value with ``talan_serve.switch``:

* after ``SamplingParams.verify`` (admission, in the tokenizer manager): a malformed value
  is refused there, before it could reach the scheduler;
* after ``Req.__init__``: a TALAN-off request gets a marker appended to its ``extra_key``,
  which is part of the radix-cache key, so it never shares prefix entries (and their
  states) with TALAN-on requests;
* after ``ForwardBatch.init_new``: each extend row's flag goes into a per-slot buffer on
  the request pool (not onto the ForwardBatch, which SGLang's runners rebuild from static
  buffers and so drop extra attributes), and a host flag says whether every request of
  the step is TALAN-on. The layer reads the flag by slot on every step.
"""

from __future__ import annotations

from typing import Any

import torch

from talan_serve.plugins.sglang import _compat
from talan_serve.plugins.sglang.state_backend import ALL_ON_ATTR, FLAGS_ATTR
from talan_serve.switch import DEFAULT_ADAPTER, NO_ADAPTER, SwitchError, route_in

OFF_MARKER = "\x1ftalan=off"


def request_enabled(sampling_params: Any) -> bool:
    """TALAN on/off for a request's SGLang sampling params (``SwitchError`` if malformed)."""
    route = route_in(getattr(sampling_params, "custom_params", None))
    if route not in (DEFAULT_ADAPTER, NO_ADAPTER):
        raise SwitchError("talan-serve: the SGLang engine serves one TALAN adapter (0), "
                          f"not adapter {route}")
    return route == DEFAULT_ADAPTER


def _after_verify(result, params, *args, **kwargs):
    request_enabled(params)
    return None


def _after_req_init(result, req, *args, **kwargs):
    if not request_enabled(req.sampling_params):
        req.extra_key = (req.extra_key or "") + OFF_MARKER
    return None


def _after_forward_batch_init_new(forward_batch, cls, batch, *args, **kwargs):
    reqs = getattr(batch, "reqs", None)
    pool = getattr(batch, "req_to_token_pool", None)
    buffer = getattr(pool, FLAGS_ATTR, None)
    if forward_batch is None or not reqs or buffer is None:
        return None
    flags = [request_enabled(r.sampling_params) for r in reqs]
    setattr(pool, ALL_ON_ATTR, all(flags))
    if forward_batch.forward_mode.is_extend() and all(
            r.kv.mamba_pool_idx is not None for r in reqs):
        slots = torch.stack([r.kv.mamba_pool_idx.reshape(()) for r in reqs])
        slots = pool.translate_mamba_indices(slots).to(device=buffer.device, dtype=torch.long)
        values = torch.tensor(flags, dtype=torch.bool).to(buffer.device, non_blocking=True)
        buffer.index_copy_(0, slots, values)
    return None


def register_hooks() -> None:
    registry = _compat.resolve("hook_registry")
    from sglang.srt.plugins.hook_registry import HookType

    registry.register(_compat.SYMBOLS["sampling_verify"], _after_verify, HookType.AFTER)
    registry.register(_compat.SYMBOLS["req_init"], _after_req_init, HookType.AFTER)
    registry.register(_compat.SYMBOLS["forward_batch_init_new"],
                      _after_forward_batch_init_new, HookType.AFTER)


def hooks_applied() -> dict[str, bool]:
    """Which hook targets carry a wrapper (SGLang's registry only logs a failed hook)."""
    return {key: hasattr(_compat.resolve(key), "__wrapped__")
            for key in _compat.HOOK_TARGETS if key != "check_server_args"}
