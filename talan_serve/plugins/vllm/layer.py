"""The TALAN state layer: vLLM's per-request state cache around the one TalanBlock.

The layer is a ``MambaBase`` so that vLLM allocates, carries, releases and (in "align"
prefix-caching mode) checkpoints one state per request (``TalanConfig.state_shape``),
exactly as for its own recurrent layers. Per step the layer only

* gathers the states of the batch's requests by their state-slot indices (zeroing those
  of requests that start one, unless the builder saw on the host that none does),
* hands the block vLLM's own ``query_start_loc`` as ``cu_seqlens`` (or nothing, when
  every request brings one token: the block's decode-step entry),
* calls ``TalanBlock.perturbation`` (all of the math lives there),
* scatters the final states back,

with tensor ops only; the per-step metadata comes from ``state_backend.py``. A
one-token-per-request step uses persistent metadata buffers and static shapes, so full
CUDA graphs capture it; other steps run it between piecewise graphs (its op is a
splitting op, like vLLM's attention and mamba ops). An eager CPU forward calls the layer
without the op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from talan_serve.block import STATE_DTYPE, TalanBlock, sequence_index
from talan_serve.config import TalanConfig
from talan_serve.plugins.vllm import _compat
from talan_serve.plugins.vllm._compat import (
    MambaAttentionBackendEnum,
    MambaBase,
    get_current_vllm_config,
    get_forward_context,
)
from talan_serve.plugins.vllm.state_backend import TalanStateBackend


class TalanStateLayer(MambaBase, nn.Module):
    """One TALAN block whose running summary lives in vLLM's state cache."""

    def __init__(self, config: TalanConfig, prefix: str, max_num_seqs: int):
        super().__init__()
        self.config = config
        self.prefix = prefix
        # fp32 weights whatever the host dtype: the checkpoint and the reference are fp32.
        self.block = TalanBlock(config).float()
        self.block.requires_grad_(False)
        # Per-request on/off flags by batch row, filled by the
        # TalanSwitch logits processor; all on when nobody writes them.
        self.register_buffer(
            "enabled_rows", torch.ones(max_num_seqs, dtype=torch.bool), persistent=False
        )
        # Whether any / every request in the batch runs TALAN-on (set by TalanSwitch).
        self.any_enabled = self.all_enabled = True
        _register_state_layer(self)

    # --- MambaBase ------------------------------------------------------------------------

    def get_state_shape(self) -> tuple[tuple[int, ...]]:
        return (self.config.state_shape,)

    def get_state_dtype(self) -> tuple[torch.dtype]:
        return (STATE_DTYPE,)

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        # Only names the state-copy function family (one temporal state per request).
        return MambaAttentionBackendEnum.LINEAR

    def get_attn_backend(self):
        return TalanStateBackend

    @property
    def is_kv_cache_tp_replicated(self) -> bool:
        # The residual stream is replicated across TP ranks, so is the state.
        return True

    # --- forward --------------------------------------------------------------------------

    def forward(self, stream: torch.Tensor) -> torch.Tensor:
        """``X~`` for the full residual stream ``X`` (num_tokens, d), in X's dtype."""
        return stream + side_path_delta(self.prefix, stream)

    def side_path(self, stream: torch.Tensor) -> torch.Tensor:
        """``X~ - X`` in ``stream``'s shape and dtype (zero for disabled requests, padding)."""
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, dict):
            metadata = metadata.get(self.prefix)
        if metadata is None:
            # Profiling / dummy run: one fresh sequence, so memory use is realistic.
            cu = torch.tensor([0, stream.shape[0]], device=stream.device, dtype=torch.long)
            return self.block.perturbation(stream, cu)[0].to(stream.dtype)

        if not self.any_enabled and not _capturing(stream):
            # Every request is the adapter-only model: nothing to compute, no state to move.
            return torch.zeros_like(stream)

        states = self.kv_cache[0]
        slots, cu_seqlens, resume = metadata.slots, metadata.cu_seqlens, metadata.resume
        # One token per request: static shapes over the (possibly graph-padded) rows.
        num_tokens = metadata.num_reqs if cu_seqlens is None else metadata.num_tokens
        hidden = stream if num_tokens == stream.shape[0] else stream[:num_tokens]
        initial = states.index_select(0, slots)
        if resume is not None:
            # where(), not a product: a never-written slot may hold NaN garbage.
            initial = torch.where(resume.view(-1, 1, 1), initial, 0.0)
        delta, final = self.block.perturbation(hidden, cu_seqlens, initial)

        if self.all_enabled and not _capturing(stream):
            states.index_copy_(0, slots, final)
        else:
            enabled = self.enabled_rows[: metadata.num_reqs]
            # A disabled request is the adapter-only model: exact identity, state untouched.
            states.index_copy_(0, slots, torch.where(enabled.view(-1, 1, 1), final, initial))
            if cu_seqlens is not None:
                enabled = enabled[sequence_index(cu_seqlens, num_tokens)]
            delta = torch.where(enabled.view(-1, 1), delta, 0.0)
        delta = delta.to(stream.dtype)
        # Python-int branch only: shapes are static under graph capture.
        if num_tokens < stream.shape[0]:
            delta = F.pad(delta, (0, 0, 0, stream.shape[0] - num_tokens))
        return delta


def side_path_delta(layer_name: str, stream: torch.Tensor) -> torch.Tensor:
    """The side path's ``X~ - X`` for ``stream``, as the model's forward calls it.

    Compiled graphs (and CUDA graph capture) need the custom op: it is the split point
    of piecewise graphs and a break of vLLM's breakable graphs, writing into an output
    buffer. An eager CPU forward calls the layer directly, which saves the dispatcher
    round trip, an empty output and a copy per step.
    """
    if torch.compiler.is_compiling() or stream.is_cuda:
        delta = torch.empty_like(stream)
        getattr(torch.ops, _compat.OP_NAMESPACE).talan_side_path(stream, delta, layer_name)
        return delta
    return get_forward_context().no_compile_layers[layer_name].side_path(stream)


def _capturing(tensor: torch.Tensor) -> bool:
    # A captured graph replays whatever the flags become: it must hold the masked path.
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


class TalanStatePlaceholder(MambaBase):
    """A state-cache layer that never runs: it only evens out vLLM's KV-cache groups.

    vLLM splits layers into KV-cache groups of equal size, and with one state layer next
    to N attention layers that size is 1: N + 1 groups, each with its own block table,
    slot mapping and metadata on every step (measured: the host's per-step bookkeeping
    times N). Declaring N - 1 placeholder state layers with the same spec makes the
    sizes match: two groups, as in a plain model plus one state group. A placeholder's
    slots take the place of the padding vLLM would otherwise add; it holds no weights
    and no forward.
    """

    def __init__(self, config: TalanConfig, prefix: str):
        super().__init__()
        self.config = config
        self.prefix = prefix
        _register_state_layer(self)

    get_state_shape = TalanStateLayer.get_state_shape
    get_state_dtype = TalanStateLayer.get_state_dtype
    mamba_type = TalanStateLayer.mamba_type
    get_attn_backend = TalanStateLayer.get_attn_backend
    is_kv_cache_tp_replicated = TalanStateLayer.is_kv_cache_tp_replicated


def _register_state_layer(layer: MambaBase) -> None:
    """Enter ``layer`` in vLLM's forward context, where its state cache is bound."""
    context = get_current_vllm_config().compilation_config.static_forward_context
    if layer.prefix in context:
        raise ValueError(f"Duplicate layer name: {layer.prefix}")
    context[layer.prefix] = layer
    layer.kv_cache = (torch.tensor([]),)


def _talan_side_path(stream: torch.Tensor, delta: torch.Tensor, layer_name: str) -> None:
    delta.copy_(get_forward_context().no_compile_layers[layer_name].side_path(stream))


_compat.register_custom_op(_talan_side_path, mutates_args=["delta"])
