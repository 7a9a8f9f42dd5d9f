"""Each request's adapter id inside SGLang: ``custom_params = {"talan": {...}}``, read in hooks.

SGLang carries a request's ``custom_params`` to the scheduler's ``Req``, not into the
forward, so hooks (SGLang's ``HookRegistry``, registered in every process) do the rest,
each reading the value with ``talan_serve.engine.requests``:

* after ``SamplingParams.verify`` (admission, in the tokenizer manager): a malformed value
  is refused there, before it could reach the scheduler;
* after ``Req.__init__``: a request that does not run adapter 0 (TALAN off, or another
  adapter of a server of many) gets its cache namespace (``cache_namespace``) as a marker
  in its ``extra_key``, which is part of the radix-cache key, so it never shares prefix
  entries (and their states) with requests of another adapter (SGLang adds the LoRA's own
  id to the key);
* after ``ForwardBatch.init_new``: each extend row's adapter id goes into a per-entry
  buffer on the request pool (not onto the ForwardBatch, which SGLang's runners rebuild
  from static buffers and so drop extra attributes), and the step's rows to the CPU for
  the layer's plan. The layer reads the adapter id by state index on every step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from talan_serve.engine.requests import OFF_NAMESPACE, cache_namespace, request_adapter
from talan_serve.plugins.sglang import _compat
from talan_serve.plugins.sglang.state_backend import ENTRY_ADAPTERS_ATTR, STEP_ADAPTERS_ATTR

MARKER_PREFIX = "\x1ftalan="
OFF_MARKER = MARKER_PREFIX + OFF_NAMESPACE


def row_adapter(sampling_params: Any) -> int:
    """The adapter id a request's SGLang sampling params run, ``NO_ADAPTER`` when TALAN is
    off (``SwitchError`` if malformed)."""
    return request_adapter(sampling_params, _compat.ARGS_FIELD)


def cache_marker(adapter: int) -> str:
    """What a request of ``adapter`` adds to its radix-cache key (adapter 0: nothing)."""
    namespace = cache_namespace(adapter)
    return "" if namespace is None else MARKER_PREFIX + namespace


def _after_verify(result, params, *args, **kwargs):
    row_adapter(params)
    return None


def _after_req_init(result, req, *args, **kwargs):
    marker = cache_marker(row_adapter(req.sampling_params))
    if marker:
        req.extra_key = (req.extra_key or "") + marker
    return None


def _after_forward_batch_init_new(forward_batch, cls, batch, *args, **kwargs):
    reqs = getattr(batch, "reqs", None)
    pool = getattr(batch, "req_to_token_pool", None)
    buffer = getattr(pool, ENTRY_ADAPTERS_ATTR, None)
    if forward_batch is None or not reqs or buffer is None:
        return None
    adapters = np.array([row_adapter(r.sampling_params) for r in reqs], dtype=np.int64)
    setattr(pool, STEP_ADAPTERS_ATTR, adapters)
    if forward_batch.forward_mode.is_extend() and all(
            r.kv.mamba_pool_idx is not None for r in reqs):
        indices = torch.stack([r.kv.mamba_pool_idx.reshape(()) for r in reqs])
        indices = pool.translate_mamba_indices(indices).to(device=buffer.device,
                                                           dtype=torch.long)
        buffer.index_copy_(0, indices, torch.from_numpy(adapters).to(buffer.device,
                                                                     non_blocking=True))
    return None


def register_hooks() -> None:
    _compat.register_hook("sampling_verify", _after_verify, "AFTER")
    _compat.register_hook("req_init", _after_req_init, "AFTER")
    _compat.register_hook("forward_batch_init_new", _after_forward_batch_init_new, "AFTER")


def hooks_applied() -> dict[str, bool]:
    """Which hook targets carry a wrapper (SGLang's registry only logs a failed hook)."""
    return {key: hasattr(_compat.resolve(key), "__wrapped__")
            for key in _compat.HOOK_TARGETS if key not in ("check_server_args", "scheduler_rpc")}
