"""TALAN's per-step state metadata: SGLang's short-conv state plumbing, unchanged.

SGLang's ``ShortConvAttnBackend`` (LFM2) already resolves, once per step, each request
row's state slot, ``query_start_loc`` and the "resumes a state" mask, and keeps a static
slot buffer refilled in place for CUDA-graph replay. This subclass only skips its
per-extend host mirrors (a device sync; the TALAN layer never loops on the host) and
hands the layer one tuple with what it reads.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from sglang.srt.layers.attention.linear.short_conv_backend import ShortConvAttnBackend

FLAGS_ATTR = "talan_flags"  # on the HybridReqToTokenPool: (slots,) bool, TALAN on by slot
ALL_ON_ATTR = "talan_batch_all_on"  # on the pool: host bool for the coming step


class TalanStateMetadata(NamedTuple):
    layer_cache: Any  # the MambaPool layer view: .conv[0] is (slots, T, d + 1) fp32
    cache_indices: torch.Tensor  # (rows,) int64 slot per row; eager padding 0, graph -1
    query_start_loc: torch.Tensor | None  # (rows + 1,) token offsets of an extend step
    has_initial_state: torch.Tensor | None  # (rows,) bool: resumes a prefix or chunk
    logical_num_tokens: int | None  # real tokens of an extend step (None: all)
    flags: torch.Tensor  # (slots,) bool: TALAN on for the request in each slot
    all_on: bool  # every request of the step is TALAN-on (host-known)


class TalanStateBackend(ShortConvAttnBackend):
    needs_extend_host_mirrors = False

    def __init__(self, model_runner):
        super().__init__(model_runner)
        pool = self.req_to_token_pool
        num_slots = pool.mamba_pool.mamba_cache.conv[0].shape[1]
        if getattr(pool, FLAGS_ATTR, None) is None:
            # All on until switch.py writes a request's flag before its first extend.
            setattr(pool, FLAGS_ATTR, torch.ones(num_slots, dtype=torch.bool,
                                                 device=self.device))
            setattr(pool, ALL_ON_ATTR, False)

    def conv_state_metadata(self, layer_id: int, forward_batch) -> TalanStateMetadata:
        metadata = self.forward_metadata
        return TalanStateMetadata(
            layer_cache=self.req_to_token_pool.mamba2_layer_cache(layer_id),
            cache_indices=self._cache_indices,
            query_start_loc=metadata.query_start_loc,
            has_initial_state=self._has_initial_state,
            logical_num_tokens=getattr(metadata, "logical_num_tokens", None),
            flags=getattr(self.req_to_token_pool, FLAGS_ATTR),
            all_on=bool(getattr(self.req_to_token_pool, ALL_ON_ATTR, False)),
        )
