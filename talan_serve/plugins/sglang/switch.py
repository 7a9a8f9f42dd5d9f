"""The per-request switch inside SGLang: ``custom_params = {"talan": {"enabled", "adapter"}}``.

SGLang carries a request's ``custom_params`` to the scheduler's ``Req``, not into the
forward, so hooks (SGLang's ``HookRegistry``, registered in every process) do the rest,
each reading the value with ``talan_serve.switch``:

* after ``SamplingParams.verify`` (admission, in the tokenizer manager): a malformed value
  is refused there, before it could reach the scheduler;
* after ``Req.__init__``: a request that does not run adapter 0 (TALAN off, or another
  adapter of a server of many) gets a marker in its ``extra_key``, which is part of the
  radix-cache key, so it never shares prefix entries (and their states) with requests of
  another adapter (SGLang adds the LoRA's own id to the key);
* after ``ForwardBatch.init_new``: each extend row's adapter goes into a per-slot buffer
  on the request pool (not onto the ForwardBatch, which SGLang's runners rebuild from
  static buffers and so drop extra attributes), and the step's rows on the host for the
  layer's plan. The layer reads the adapter by slot on every step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from talan_serve.plugins.sglang import _compat
from talan_serve.plugins.sglang.state_backend import ROUTES_ATTR, STEP_ROUTES_ATTR
from talan_serve.switch import DEFAULT_ADAPTER, NO_ADAPTER, route_in

OFF_MARKER = "\x1ftalan=off"


def request_route(sampling_params: Any) -> int:
    """The adapter a request's SGLang sampling params run, ``NO_ADAPTER`` when TALAN is
    off (``SwitchError`` if malformed)."""
    return route_in(getattr(sampling_params, "custom_params", None))


def request_enabled(sampling_params: Any) -> bool:
    return request_route(sampling_params) != NO_ADAPTER


def cache_marker(route: int) -> str:
    """What a request of ``route`` adds to its radix-cache key (adapter 0: nothing)."""
    if route == DEFAULT_ADAPTER:
        return ""
    return OFF_MARKER if route == NO_ADAPTER else f"\x1ftalan={route}"


def _after_verify(result, params, *args, **kwargs):
    request_route(params)
    return None


def _after_req_init(result, req, *args, **kwargs):
    marker = cache_marker(request_route(req.sampling_params))
    if marker:
        req.extra_key = (req.extra_key or "") + marker
    return None


def _after_forward_batch_init_new(forward_batch, cls, batch, *args, **kwargs):
    reqs = getattr(batch, "reqs", None)
    pool = getattr(batch, "req_to_token_pool", None)
    buffer = getattr(pool, ROUTES_ATTR, None)
    if forward_batch is None or not reqs or buffer is None:
        return None
    routes = np.array([request_route(r.sampling_params) for r in reqs], dtype=np.int64)
    setattr(pool, STEP_ROUTES_ATTR, routes)
    if forward_batch.forward_mode.is_extend() and all(
            r.kv.mamba_pool_idx is not None for r in reqs):
        slots = torch.stack([r.kv.mamba_pool_idx.reshape(()) for r in reqs])
        slots = pool.translate_mamba_indices(slots).to(device=buffer.device, dtype=torch.long)
        buffer.index_copy_(0, slots, torch.from_numpy(routes).to(buffer.device,
                                                                  non_blocking=True))
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
            for key in _compat.HOOK_TARGETS if key not in ("check_server_args", "scheduler_rpc")}
