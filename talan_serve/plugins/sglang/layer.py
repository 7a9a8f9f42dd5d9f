"""The TALAN state layer: SGLang's per-request state pool around the TALAN adapters.

Per step and connection point the layer only adapts SGLang's batch metadata
(``state_backend.py``) to ``TalanAdapterSet.step`` (``talan_serve.adapters``; all of the
math is ``TalanBlock``'s):

* state slots: each request row's pool slot (eager padding rows hold slot 0, the pool's
  padding slot; CUDA-graph padding rows hold -1, clamped to 0, whose contents are scratch);
* ``cu_seqlens`` = ``query_start_loc`` on extend steps (prefill and mixed batches), None on
  decode steps (one token per row: the block's decode entry);
* new requests: SGLang zeroes their slot before the forward, a radix-cache hit copies the
  cached state into it, a later chunk keeps its slot; "resumes a state" also masks the
  read, so a never-written slot cannot leak into a fresh request;
* each row's adapter (``switch.py``): a per-slot adapter id on the device, read by slot on
  every step, so a captured decode graph sees the current requests, and the step's rows
  on the host for an eager step's plan. A TALAN-off row (``NO_ADAPTER``) gets a zero delta
  and keeps its state.

One checkpoint is a set of one adapter (id 0); a server of many loads adapters into the
set at run time (``rpc.py``). Every request has one state slot, sized for the set's
largest T, whichever connection point its adapter uses.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from talan_serve.adapters import TalanAdapterSet, fit_rows, plan_step


class TalanStateLayer(nn.Module):
    def __init__(self, adapters: TalanAdapterSet, layer_id: int):
        super().__init__()
        self.adapters = adapters
        self.layer_id = layer_id

    def forward(self, stream: torch.Tensor, forward_batch, point: str) -> torch.Tensor:
        """``X~`` at connection ``point`` for the full residual stream ``X`` (num_tokens,
        d), in X's dtype."""
        return stream + self.side_path(stream, forward_batch, point)

    def side_path(self, stream: torch.Tensor, forward_batch, point: str) -> torch.Tensor:
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
            return self.step(stream, states, metadata.cache_indices, metadata.routes, point,
                             rows=metadata.step_routes)
        return self.step(stream, states, metadata.cache_indices, metadata.routes, point,
                         cu_seqlens=metadata.query_start_loc.long(),
                         cu_seqlens_host=_offsets(forward_batch.extend_seq_lens_cpu),
                         resumes=metadata.has_initial_state,
                         num_tokens=metadata.logical_num_tokens, rows=metadata.step_routes)

    def step(
        self,
        stream: torch.Tensor,
        states: torch.Tensor,
        cache_indices: torch.Tensor,
        routes: torch.Tensor,
        point: str,
        cu_seqlens: torch.Tensor | None = None,
        cu_seqlens_host: np.ndarray | None = None,
        resumes: torch.Tensor | None = None,
        num_tokens: int | None = None,
        rows: np.ndarray | None = None,
    ) -> torch.Tensor:
        """One step's ``X~ - X`` at ``point`` from SGLang's metadata, in ``stream``'s dtype.

        ``states`` (slots, T, d + 1) and ``routes`` (slots,) are the pool's, by slot;
        ``cache_indices`` each row's slot (-1 for CUDA-graph padding); ``cu_seqlens`` the
        rows' token offsets (and ``cu_seqlens_host`` their host copy), or None for a
        decode step (one token per row); ``rows``: each row's adapter on the host (the
        eager step's plan). Needs no SGLang: the GPU check captures it as it is.
        """
        slots = cache_indices.clamp(min=0)
        if cu_seqlens is None:
            num_tokens = slots.shape[0]
        num_tokens = num_tokens or stream.shape[0]
        hidden = stream if num_tokens == stream.shape[0] else stream[:num_tokens]
        plan = device_rows = None
        capturing = _capturing(stream)
        if capturing:
            # A captured graph replays whatever the requests and the loaded adapters
            # become: it reads each row's adapter by slot, over every stack at this point.
            self.adapters.seal()
        if capturing or rows is None:
            device_rows = routes.index_select(0, slots)
        else:
            plan = plan_step(fit_rows(rows, slots.shape[0]), cu_seqlens_host, cu_seqlens,
                             stream.device, self.adapters.adapters_at(point),
                             self.adapters.stack_of)
            if not plan.groups:
                # No row runs an adapter here: nothing to compute, no state to move.
                return torch.zeros_like(stream)
        delta = self.adapters.step(hidden, states, slots, point,
                                   cu_seqlens=cu_seqlens, resume=resumes, plan=plan,
                                   row_adapters=device_rows).to(stream.dtype)
        if num_tokens < stream.shape[0]:
            delta = F.pad(delta, (0, 0, 0, stream.shape[0] - num_tokens))
        return delta


def _offsets(lengths) -> np.ndarray | None:
    if lengths is None:
        return None
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _capturing(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()
