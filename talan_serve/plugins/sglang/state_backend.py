"""TALAN's per-step state metadata: SGLang's short-conv state plumbing, unchanged.

SGLang's ``ShortConvAttnBackend`` (LFM2) already resolves, once per step, each request
row's state index, ``query_start_loc`` and the "resumes a state" mask, and keeps a static
index buffer refilled in place for CUDA-graph replay. This subclass only skips its
per-extend host mirrors (a device sync; the TALAN layer's plan comes from the scheduler's
own CPU lists) and hands the layer one tuple with what it reads.
"""

from __future__ import annotations

import torch

from talan_serve.plugins.sglang import _compat
from talan_serve.plugins.sglang.layer import SglangStateMetadata
from talan_serve.switch import DEFAULT_ADAPTER

# On the HybridReqToTokenPool: (pool entries,) int64, the adapter id of the request in
# each entry; and the coming step's (rows,) adapter ids on the CPU.
ENTRY_ADAPTERS_ATTR = "talan_entry_adapters"
STEP_ADAPTERS_ATTR = "talan_step_adapters"


class SglangStateBackend(_compat.resolve("short_conv_backend")):
    needs_extend_host_mirrors = False

    def __init__(self, model_runner):
        super().__init__(model_runner)
        pool = self.req_to_token_pool
        num_entries = pool.mamba_pool.mamba_cache.conv[0].shape[1]
        if getattr(pool, ENTRY_ADAPTERS_ATTR, None) is None:
            # Adapter 0 until rows.py writes a request's adapter before its first extend.
            setattr(pool, ENTRY_ADAPTERS_ATTR, torch.full((num_entries,), DEFAULT_ADAPTER,
                                                          dtype=torch.long, device=self.device))
            setattr(pool, STEP_ADAPTERS_ATTR, None)

    def conv_state_metadata(self, layer_id: int, forward_batch) -> SglangStateMetadata:
        metadata = self.forward_metadata
        pool = self.req_to_token_pool
        return SglangStateMetadata(
            layer_cache=pool.mamba2_layer_cache(layer_id),
            cache_indices=self._cache_indices,
            query_start_loc=metadata.query_start_loc,
            has_initial_state=self._has_initial_state,
            logical_num_tokens=getattr(metadata, "logical_num_tokens", None),
            entry_adapters=getattr(pool, ENTRY_ADAPTERS_ATTR),
            step_adapters=getattr(pool, STEP_ADAPTERS_ATTR, None),
        )
