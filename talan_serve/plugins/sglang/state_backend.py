"""TALAN's per-step state metadata: SGLang's short-conv state plumbing, unchanged.

SGLang's ``ShortConvAttnBackend`` (LFM2) already resolves, once per step, each request
row's state slot, ``query_start_loc`` and the "resumes a state" mask, and keeps a static
slot buffer refilled in place for CUDA-graph replay. This subclass only skips its
per-extend host mirrors (a device sync; the TALAN layer's host plan comes from the
scheduler's own host lists) and hands the layer one tuple with what it reads.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from sglang.srt.layers.attention.linear.short_conv_backend import ShortConvAttnBackend

from talan_serve.switch import DEFAULT_ADAPTER

ROUTES_ATTR = "talan_routes"  # on the HybridReqToTokenPool: (slots,) int64 adapter by slot
STEP_ROUTES_ATTR = "talan_step_routes"  # on the pool: host (rows,) adapters of the coming step


class TalanStateMetadata(NamedTuple):
    layer_cache: Any  # the MambaPool layer view: .conv[0] is (slots, T, d + 1) fp32
    cache_indices: torch.Tensor  # (rows,) int64 slot per row; eager padding 0, graph -1
    query_start_loc: torch.Tensor | None  # (rows + 1,) token offsets of an extend step
    has_initial_state: torch.Tensor | None  # (rows,) bool: resumes a prefix or chunk
    logical_num_tokens: int | None  # real tokens of an extend step (None: all)
    routes: torch.Tensor  # (slots,) int64: the adapter of the request in each slot
    step_routes: np.ndarray | None  # (rows,) the step's adapters on the host


class TalanStateBackend(ShortConvAttnBackend):
    needs_extend_host_mirrors = False

    def __init__(self, model_runner):
        super().__init__(model_runner)
        pool = self.req_to_token_pool
        num_slots = pool.mamba_pool.mamba_cache.conv[0].shape[1]
        if getattr(pool, ROUTES_ATTR, None) is None:
            # Adapter 0 until switch.py writes a request's adapter before its first extend.
            setattr(pool, ROUTES_ATTR, torch.full((num_slots,), DEFAULT_ADAPTER,
                                                  dtype=torch.long, device=self.device))
            setattr(pool, STEP_ROUTES_ATTR, None)

    def conv_state_metadata(self, layer_id: int, forward_batch) -> TalanStateMetadata:
        metadata = self.forward_metadata
        pool = self.req_to_token_pool
        return TalanStateMetadata(
            layer_cache=pool.mamba2_layer_cache(layer_id),
            cache_indices=self._cache_indices,
            query_start_loc=metadata.query_start_loc,
            has_initial_state=self._has_initial_state,
            logical_num_tokens=getattr(metadata, "logical_num_tokens", None),
            routes=getattr(pool, ROUTES_ATTR),
            step_routes=getattr(pool, STEP_ROUTES_ATTR, None),
        )
