"""The TALAN state layer: SGLang's per-request state pool around the side path.

Per step and connection point the layer only turns SGLang's batch metadata
(``state_backend.py``) into one ``SidePath.step`` (``talan_serve.engine.side_path``, the
same step every engine runs; all of the math is ``TalanBlock``'s):

* state indices: each request row's pool entry (eager padding rows hold entry 0, the
  pool's padding entry; CUDA-graph padding rows hold -1, clamped to 0, whose contents
  are scratch);
* ``cu_seqlens`` = ``query_start_loc`` on extend steps (prefill and mixed batches), None on
  decode steps (one token per row: the block's decode entry);
* new requests: SGLang zeroes their entry before the forward, a radix-cache hit copies the
  cached state into it, a later chunk keeps its entry; "resumes a state" also masks the
  read, so a never-written entry cannot leak into a fresh request;
* each row's adapter id (``rows.py``): a per-entry adapter id on the device, read by state
  index on every step, so a captured decode graph sees the current requests, and the
  step's rows on the CPU for an eager step's plan. A TALAN-off row (``NO_ADAPTER``) gets
  a zero delta and keeps its state.

``step_batch`` needs no SGLang: the GPU check builds SGLang's padded decode step with it
and captures ``SidePath.step`` as it is.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from talan_serve.engine.side_path import SidePath, StepBatch


class SglangStateMetadata(NamedTuple):
    layer_cache: Any  # the MambaPool layer view: .conv[0] is (entries, T, d + 1) fp32
    cache_indices: torch.Tensor  # (rows,) int64 entry per row; eager padding 0, graph -1
    query_start_loc: torch.Tensor | None  # (rows + 1,) token offsets of an extend step
    has_initial_state: torch.Tensor | None  # (rows,) bool: resumes a prefix or chunk
    logical_num_tokens: int | None  # real tokens of an extend step (None: all)
    entry_adapters: torch.Tensor  # (entries,) int64: the adapter id of each entry's request
    step_adapters: np.ndarray | None  # (rows,) the step's adapter ids on the CPU


def step_batch(states: torch.Tensor, cache_indices: torch.Tensor,
               entry_adapters: torch.Tensor, num_stream_tokens: int, *,
               cu_seqlens: torch.Tensor | None = None, cu_seqlens_cpu: np.ndarray | None = None,
               resume: torch.Tensor | None = None, num_tokens: int | None = None,
               rows_cpu: np.ndarray | None = None) -> StepBatch:
    """The ``StepBatch`` of one SGLang step: the pool's states and per-entry adapter ids,
    each row's entry (``cache_indices``, -1 for CUDA-graph padding), the rows' token offsets
    (None: one token per row) and their adapter ids on the CPU (None: read on the device)."""
    indices = cache_indices.clamp(min=0)
    if cu_seqlens is None:
        num_tokens = indices.shape[0]
    return StepBatch(
        states=states, indices=indices, num_tokens=num_tokens or num_stream_tokens,
        cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu, resume=resume,
        rows_cpu=rows_cpu, rows_device=lambda: entry_adapters.index_select(0, indices))


class SglangStateLayer(nn.Module):
    """The side path of one model, whose per-request states live in SGLang's state pool,
    registered under decoder layer ``layer_id`` (``config.state_layer_id``)."""

    def __init__(self, side_path: SidePath, layer_id: int):
        super().__init__()
        self.side_path = side_path
        self.layer_id = layer_id

    def forward(self, stream: torch.Tensor, forward_batch, point: str) -> torch.Tensor:
        """``X~`` at connection ``point`` for the full residual stream ``X`` (num_tokens,
        d), in X's dtype."""
        return stream + self.run(stream, forward_batch, point)

    def run(self, stream: torch.Tensor, forward_batch, point: str) -> torch.Tensor:
        from talan_serve.plugins.sglang._compat import resolve

        mode = forward_batch.forward_mode
        if mode.is_idle() or stream.shape[0] == 0:
            return torch.zeros_like(stream)
        decode = mode.is_decode()
        if not decode and not (mode == type(mode).EXTEND or mode.is_mixed()):
            # Speculative decoding, split prefill and dLLM are refused at startup
            # (guards.py); a mode SGLang adds later must not run unnoticed.
            raise NotImplementedError(f"talan-serve: SGLang forward mode {mode.name} is not "
                                      "supported for TALAN models")
        metadata = resolve("get_attn_backend")().conv_state_metadata(self.layer_id,
                                                                     forward_batch)
        states = metadata.layer_cache.conv[0]
        if decode:
            batch = step_batch(states, metadata.cache_indices, metadata.entry_adapters,
                               stream.shape[0], rows_cpu=metadata.step_adapters)
        else:
            batch = step_batch(states, metadata.cache_indices, metadata.entry_adapters,
                               stream.shape[0], cu_seqlens=metadata.query_start_loc.long(),
                               cu_seqlens_cpu=_offsets(forward_batch.extend_seq_lens_cpu),
                               resume=metadata.has_initial_state,
                               num_tokens=metadata.logical_num_tokens,
                               rows_cpu=metadata.step_adapters)
        return self.side_path.step(stream, point, batch)


def _offsets(lengths) -> np.ndarray | None:
    if lengths is None:
        return None
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets
