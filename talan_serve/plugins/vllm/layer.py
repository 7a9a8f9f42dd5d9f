"""The TALAN state layer: vLLM's per-request state cache around the side path.

The layer is a ``MambaBase`` so that vLLM allocates, carries, releases and (in "align"
prefix-caching mode) checkpoints one state per request (``AdapterSetSpec.state_shape``),
exactly as for its own recurrent layers. Per step and connection point it only turns
vLLM's metadata (``state_backend.py``: each row's state index, "resumes a state", vLLM's
own ``query_start_loc`` as ``cu_seqlens``, or nothing when every request brings one token)
and each row's adapter id (``rows.py``) into one ``SidePath.step`` (``batch.py``)
(``talan_serve.engine.side_path``, the same step every engine runs; all of the math is
``TalanBlock``'s). A one-token-per-request step uses persistent metadata buffers and
static shapes, so full CUDA graphs capture it; other steps run it between piecewise
graphs (its op is a splitting op, like vLLM's attention and mamba ops). An eager CPU
forward calls the layer without the op.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from talan_serve.block import STATE_DTYPE
from talan_serve.engine.side_path import SidePath
from talan_serve.plugins.vllm import _compat
from talan_serve.plugins.vllm._compat import (
    MambaAttentionBackendEnum,
    MambaBase,
    get_current_vllm_config,
    get_forward_context,
)
from talan_serve.plugins.vllm.batch import step_batch
from talan_serve.plugins.vllm.state_backend import VllmStateBackend


class VllmStateLayer(MambaBase, nn.Module):
    """The side path of one model, whose per-request states live in vLLM's state cache."""

    def __init__(self, side_path: SidePath, prefix: str, max_num_seqs: int):
        super().__init__()
        self.prefix = prefix
        self.side_path = side_path
        # Each batch row's adapter id (NO_ADAPTER: TALAN off, or the plain base model),
        # written by the RowAdapterTracker logits processor: on the CPU for the eager
        # step's plan, on the device (fixed address) for what a captured graph reads.
        self.row_adapters = np.zeros(0, dtype=np.int64)
        self.register_buffer(
            "row_adapter_buffer", torch.zeros(max_num_seqs, dtype=torch.long), persistent=False
        )
        _register_state_layer(self)

    def set_row_adapters(self, rows: np.ndarray) -> None:
        self.row_adapters = rows.copy()
        self.row_adapter_buffer[: rows.shape[0]].copy_(torch.from_numpy(rows),
                                                       non_blocking=True)

    # --- MambaBase ------------------------------------------------------------------------

    def get_state_shape(self) -> tuple[tuple[int, ...]]:
        return (self.side_path.adapters.state_shape,)

    def get_state_dtype(self) -> tuple[torch.dtype]:
        return (STATE_DTYPE,)

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        # Only names the state-copy function family (one temporal state per request).
        return MambaAttentionBackendEnum.LINEAR

    def get_attn_backend(self):
        return VllmStateBackend

    @property
    def is_kv_cache_tp_replicated(self) -> bool:
        # The residual stream is replicated across TP ranks, so is the state.
        return True

    # --- forward --------------------------------------------------------------------------

    def run(self, stream: torch.Tensor, point: str) -> torch.Tensor:
        """``X~ - X`` at connection ``point``, in ``stream``'s shape and dtype."""
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, dict):
            metadata = metadata.get(self.prefix)
        if metadata is None:  # profiling / dummy run
            return self.side_path.profile(stream, point)
        return self.side_path.step(stream, point, step_batch(
            metadata, self.kv_cache[0], self.row_adapters, self.row_adapter_buffer))


def side_path_delta(layer_name: str, point: str, stream: torch.Tensor) -> torch.Tensor:
    """The side path's ``X~ - X`` at connection ``point``, as the model's forward calls it.

    Compiled graphs (and CUDA graph capture) need the custom op: it is the split point
    of piecewise graphs and a break of vLLM's breakable graphs, writing into an output
    buffer. An eager CPU forward calls the layer directly, which saves the dispatcher
    round trip, an empty output and a copy per step.
    """
    if torch.compiler.is_compiling() or stream.is_cuda:
        delta = torch.empty_like(stream)
        getattr(torch.ops, _compat.OP_NAMESPACE).talan_side_path(stream, delta, layer_name,
                                                                 point)
        return delta
    return get_forward_context().no_compile_layers[layer_name].run(stream, point)


class TalanStatePlaceholder(MambaBase):
    """A state-cache layer that never runs: it only evens out vLLM's KV-cache groups.

    vLLM splits layers into KV-cache groups of equal size, and with one state layer next
    to N attention layers that size is 1: N + 1 groups, each with its own block table,
    slot mapping and metadata on every step (measured: the CPU's per-step bookkeeping
    times N). Declaring N - 1 placeholder state layers with the same spec makes the
    sizes match: two groups, as in a plain model plus one state group. A placeholder's
    cache entries take the place of the padding vLLM would otherwise add; it holds no
    weights and no forward.
    """

    def __init__(self, state_shape: tuple[int, int], prefix: str):
        super().__init__()
        self._state_shape = state_shape
        self.prefix = prefix
        _register_state_layer(self)

    def get_state_shape(self) -> tuple[tuple[int, ...]]:
        return (self._state_shape,)

    get_state_dtype = VllmStateLayer.get_state_dtype
    mamba_type = VllmStateLayer.mamba_type
    get_attn_backend = VllmStateLayer.get_attn_backend
    is_kv_cache_tp_replicated = VllmStateLayer.is_kv_cache_tp_replicated


def _register_state_layer(layer: MambaBase) -> None:
    """Enter ``layer`` in vLLM's forward context, where its state cache is bound."""
    context = get_current_vllm_config().compilation_config.static_forward_context
    if layer.prefix in context:
        raise ValueError(f"Duplicate layer name: {layer.prefix}")
    context[layer.prefix] = layer
    layer.kv_cache = (torch.tensor([]),)


def _talan_side_path(stream: torch.Tensor, delta: torch.Tensor, layer_name: str,
                     point: str) -> None:
    delta.copy_(get_forward_context().no_compile_layers[layer_name].run(stream, point))


_compat.register_custom_op(_talan_side_path, mutates_args=["delta"])
