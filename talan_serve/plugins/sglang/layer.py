"""The TALAN state layer: SGLang's per-request state pool around the one TalanBlock.

Per step the layer only adapts SGLang's batch metadata (``state_backend.py``) to
``TalanBlock.perturbation``:

* state slots: each request row's pool slot (eager padding rows hold slot 0, the pool's
  padding slot; CUDA-graph padding rows hold -1, clamped to 0, whose contents are scratch);
* ``cu_seqlens`` = ``query_start_loc`` on extend steps (prefill and mixed batches), None on
  decode steps (one token per row: the block's decode entry);
* new requests: SGLang zeroes their slot before the forward, a radix-cache hit copies the
  cached state into it, a later chunk keeps its slot; "resumes a state" also masks the
  read, so a never-written slot cannot leak into a fresh request;
* the switch: a per-slot flag (``switch.py``), read by slot on every step so a captured
  decode graph sees the current flags. A TALAN-off row gets a zero delta and keeps its state.

Tensor ops with shapes fixed by the inputs on the decode path: no host sync, no branch on
tensor values, so a decode CUDA graph can capture it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from talan_serve.block import TalanBlock, sequence_index
from talan_serve.config import TalanConfig


class TalanStateLayer(nn.Module):
    def __init__(self, config: TalanConfig, layer_id: int):
        super().__init__()
        self.config = config
        self.layer_id = layer_id
        # fp32 weights whatever the host dtype: the checkpoint and the reference are fp32.
        self.block = TalanBlock(config).float()
        self.block.requires_grad_(False)

    def initial_states(self, states: torch.Tensor, slots: torch.Tensor,
                       resumes: torch.Tensor | None) -> torch.Tensor:
        initial = states.index_select(0, slots)
        if resumes is not None:
            # where(), not a product: a never-written slot may hold NaN garbage.
            initial = torch.where(resumes.view(-1, 1, 1), initial, 0.0)
        return initial

    def forward(self, stream: torch.Tensor, forward_batch) -> torch.Tensor:
        """``X~`` for the full residual stream ``X`` (num_tokens, d), in X's dtype."""
        return stream + self.side_path(stream, forward_batch)

    def side_path(self, stream: torch.Tensor, forward_batch) -> torch.Tensor:
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
        if decode:
            return self.step(stream, metadata.layer_cache.conv[0], metadata.cache_indices,
                             metadata.flags, all_on=metadata.all_on)
        return self.step(stream, metadata.layer_cache.conv[0], metadata.cache_indices,
                         metadata.flags, cu_seqlens=metadata.query_start_loc.long(),
                         resumes=metadata.has_initial_state,
                         num_tokens=metadata.logical_num_tokens, all_on=metadata.all_on)

    def step(
        self,
        stream: torch.Tensor,
        states: torch.Tensor,
        cache_indices: torch.Tensor,
        flags: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        resumes: torch.Tensor | None = None,
        num_tokens: int | None = None,
        all_on: bool = False,
    ) -> torch.Tensor:
        """One step's ``X~ - X`` from SGLang's metadata, in ``stream``'s dtype.

        ``states`` (slots, T, d + 1) and ``flags`` (slots,) are the pool's, by slot;
        ``cache_indices`` each row's slot (-1 for CUDA-graph padding); ``cu_seqlens`` the
        rows' token offsets, or None for a decode step (one token per row). Needs no
        SGLang: the GPU check captures it in a CUDA graph as it is.
        """
        slots = cache_indices.clamp(min=0)
        enabled = flags.index_select(0, slots)
        if cu_seqlens is None:
            num_tokens = slots.shape[0]
        num_tokens = num_tokens or stream.shape[0]
        initial = self.initial_states(states, slots, resumes if cu_seqlens is not None
                                      else None)
        hidden = stream if num_tokens == stream.shape[0] else stream[:num_tokens]
        delta, final = self.block.perturbation(hidden, cu_seqlens, initial)
        if not (all_on and not _capturing(stream)):
            # A TALAN-off request is the adapter-only model: zero delta, state untouched.
            final = torch.where(enabled.view(-1, 1, 1), final, initial)
            rows = enabled if cu_seqlens is None else \
                enabled[sequence_index(cu_seqlens, num_tokens)]
            delta = torch.where(rows.view(-1, 1), delta, 0.0)
        states.index_copy_(0, slots, final)
        delta = delta.to(stream.dtype)
        if num_tokens < stream.shape[0]:
            delta = F.pad(delta, (0, 0, 0, stream.shape[0] - num_tokens))
        return delta


def _capturing(tensor: torch.Tensor) -> bool:
    # A captured graph replays whatever the flags become: it must hold the masked path.
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()
