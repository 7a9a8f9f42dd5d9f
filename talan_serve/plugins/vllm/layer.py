"""The TALAN state layer: vLLM's per-request state cache around the TALAN adapters.

The layer is a ``MambaBase`` so that vLLM allocates, carries, releases and (in "align"
prefix-caching mode) checkpoints one state per request (``TalanAdapterSet.state_shape``),
exactly as for its own recurrent layers. Per step and connection point the layer only

* gathers the states of the batch's requests by their state-slot indices (zeroing those
  of requests that start one, unless the builder saw on the host that none does),
* hands the adapters vLLM's own ``query_start_loc`` as ``cu_seqlens`` (or nothing, when
  every request brings one token: the block's decode-step entry) and each row's adapter
  (``talan_serve.adapters``; all of the math is ``TalanBlock``'s),
* scatters the final states back,

with tensor ops only; the per-step metadata comes from ``state_backend.py``. A
one-token-per-request step uses persistent metadata buffers and static shapes, so full
CUDA graphs capture it; other steps run it between piecewise graphs (its op is a
splitting op, like vLLM's attention and mamba ops). An eager CPU forward calls the layer
without the op.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from talan_serve.adapters import (
    StepPlan,
    TalanAdapterSet,
    fit_rows,
    plan_step,
)
from talan_serve.block import STATE_DTYPE
from talan_serve.plugins.vllm import _compat
from talan_serve.plugins.vllm._compat import (
    MambaAttentionBackendEnum,
    MambaBase,
    get_current_vllm_config,
    get_forward_context,
)
from talan_serve.plugins.vllm.state_backend import TalanStateBackend, TalanStateMetadata


class TalanStateLayer(MambaBase, nn.Module):
    """The TALAN adapters of one model, whose running summaries live in vLLM's state cache.

    One checkpoint is a set of one adapter (id 0); a server of many adapters loads them
    into the set at run time (``worker.TalanWorkerExtension``). Every request has one state
    slot, sized for the set's largest T, whichever connection point its adapter uses.
    """

    def __init__(self, adapters: TalanAdapterSet, prefix: str, max_num_seqs: int):
        super().__init__()
        self.prefix = prefix
        self.adapters = adapters
        # Each batch row's adapter id (NO_ADAPTER: TALAN off, or the plain base model),
        # written by the TalanSwitch logits processor: on the host for the eager step's
        # plan, on the device (fixed address) for what a captured graph reads on replay.
        self.row_adapters = np.zeros(0, dtype=np.int64)
        self.register_buffer(
            "row_adapter_buffer", torch.zeros(max_num_seqs, dtype=torch.long), persistent=False
        )
        self._decode_plans: dict[str, StepPlan] = {}
        _register_state_layer(self)

    def set_row_adapters(self, rows: np.ndarray) -> None:
        self.row_adapters = rows.copy()
        self.row_adapter_buffer[: rows.shape[0]].copy_(torch.from_numpy(rows),
                                                       non_blocking=True)
        self._decode_plans = {}

    def adapters_changed(self) -> None:
        self._decode_plans = {}

    # --- MambaBase ------------------------------------------------------------------------

    def get_state_shape(self) -> tuple[tuple[int, ...]]:
        return (self.adapters.state_shape,)

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

    def _plan(self, metadata: TalanStateMetadata, point: str) -> StepPlan:
        rows = fit_rows(self.row_adapters, metadata.num_reqs)
        adapters = self.adapters.adapters_at(point)
        device = self.row_adapter_buffer.device
        if metadata.cu_seqlens is None:
            # A decode step's plan depends on the rows only: kept until they change.
            plan = self._decode_plans.get(point)
            if plan is None:
                plan = self._decode_plans[point] = plan_step(
                    rows, None, None, device, adapters, self.adapters.stack_of)
            return plan
        return plan_step(rows, metadata.cu_seqlens_host, metadata.cu_seqlens, device, adapters,
                         self.adapters.stack_of)

    def side_path(self, stream: torch.Tensor, point: str) -> torch.Tensor:
        """``X~ - X`` at connection ``point``, in ``stream``'s shape and dtype (zero for
        rows whose adapter is elsewhere or none, and for padding)."""
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, dict):
            metadata = metadata.get(self.prefix)
        adapters = self.adapters.adapters_at(point)
        if metadata is None:
            # Profiling / dummy run: one fresh sequence, so memory use is realistic.
            if not adapters:
                return torch.zeros_like(stream)
            cu = torch.tensor([0, stream.shape[0]], device=stream.device, dtype=torch.long)
            block = self.adapters.block(adapters[0])
            return block.perturbation(stream, cu)[0].to(stream.dtype)

        capturing = _capturing(stream)
        plan = None if capturing else self._plan(metadata, point)
        if plan is not None and not plan.groups:
            # No row runs an adapter here: nothing to compute, no state to move.
            return torch.zeros_like(stream)

        slots, cu_seqlens = metadata.slots, metadata.cu_seqlens
        # One token per request: static shapes over the (possibly graph-padded) rows.
        num_tokens = metadata.num_reqs if cu_seqlens is None else metadata.num_tokens
        hidden = stream if num_tokens == stream.shape[0] else stream[:num_tokens]
        rows = None
        if capturing:
            # A captured graph replays whatever the rows and the loaded adapters become:
            # it holds every stack at this point (no new kinds from now on).
            self.adapters.seal()
            rows = self.row_adapter_buffer[: metadata.num_reqs]
        delta = self.adapters.step(hidden, self.kv_cache[0], slots, point,
                                   cu_seqlens=cu_seqlens, resume=metadata.resume, plan=plan,
                                   row_adapters=rows)
        delta = delta.to(stream.dtype)
        # Python-int branch only: shapes are static under graph capture.
        if num_tokens < stream.shape[0]:
            delta = F.pad(delta, (0, 0, 0, stream.shape[0] - num_tokens))
        return delta


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
    return get_forward_context().no_compile_layers[layer_name].side_path(stream, point)


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

    def __init__(self, adapters: TalanAdapterSet, prefix: str):
        super().__init__()
        # Not a submodule: the placeholder only needs the set's state shape.
        self._state_shape = adapters.state_shape
        self.prefix = prefix
        _register_state_layer(self)

    def get_state_shape(self) -> tuple[tuple[int, ...]]:
        return (self._state_shape,)

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


def _talan_side_path(stream: torch.Tensor, delta: torch.Tensor, layer_name: str,
                     point: str) -> None:
    delta.copy_(get_forward_context().no_compile_layers[layer_name].side_path(stream, point))


_compat.register_custom_op(_talan_side_path, mutates_args=["delta"])
