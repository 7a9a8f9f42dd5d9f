"""The TALAN state layer: vLLM's per-request state cache around the one TalanBlock.

The layer is a ``MambaBase`` so that vLLM allocates, carries, releases and (in "align"
prefix-caching mode) checkpoints one ``(T, d + 1)`` fp32 state per request, exactly as
for its own recurrent layers. Per step the layer only

* gathers the states of the batch's requests by their state-slot indices,
* builds ``cu_seqlens`` from vLLM's metadata (decode tokens come first, one each),
* calls ``TalanBlock.perturbation`` (all of the math lives there),
* scatters the final states back,

with tensor ops only. A decode-only step uses persistent metadata buffers and static
shapes, so full CUDA graphs capture it; other steps run it between piecewise graphs
(its op is a splitting op, like vLLM's attention and mamba ops).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.v1.attention.backends.mamba_attn import (
    BaseMambaAttentionMetadata,
    BaseMambaAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
from vllm.v1.attention.backends.short_conv_attn import ShortConvAttentionBackend

from talan_serve.block import TalanBlock, sequence_index
from talan_serve.config import TalanConfig
from talan_serve.engines.vllm import _compat, switch


@dataclass
class TalanStateMetadata(BaseMambaAttentionMetadata):
    # Whether each decode row resumes a state (False for CUDA-graph padding rows).
    has_initial_states_d: torch.Tensor | None = None


class TalanStateMetadataBuilder(BaseMambaAttentionMetadataBuilder[TalanStateMetadata]):
    """vLLM's mamba metadata (slots, decode/prefill split) plus decode-row resume flags."""

    metadata_cls = TalanStateMetadata
    needs_causal_conv1d_metadata = False

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if self.use_spec_decode:
            raise ValueError("talan-serve: TALAN does not support speculative decoding yet")
        self.has_initial_states_d_buffer = torch.zeros(
            (self.decode_cudagraph_max_bs,), dtype=torch.bool, device=device
        )

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False, **kwargs):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build, **kwargs)
        if metadata.num_decodes == 0:
            return metadata
        num_computed = common_attn_metadata.compute_num_computed_tokens()
        has_initial_d = num_computed[: metadata.num_decodes] > 0
        rows = metadata.state_indices_tensor_d.shape[0]
        if (
            metadata.num_prefills == 0
            and self.compilation_config.cudagraph_mode.has_full_cudagraphs()
            and rows <= self.decode_cudagraph_max_bs
        ):
            # Full CUDA graphs replay fixed addresses: a persistent buffer, and the
            # graph's padding rows (slot NULL_BLOCK_ID) never resume a state.
            buffer = self.has_initial_states_d_buffer
            buffer[: metadata.num_decodes].copy_(has_initial_d, non_blocking=True)
            buffer[metadata.num_decodes : rows].fill_(False)
            has_initial_d = buffer[:rows]
        return replace(metadata, has_initial_states_d=has_initial_d)


class TalanStateBackend(ShortConvAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "TALAN_STATE"

    @staticmethod
    def get_builder_cls() -> type[TalanStateMetadataBuilder]:
        return TalanStateMetadataBuilder


class TalanStateLayer(MambaBase, nn.Module):
    """One TALAN block whose running summary lives in vLLM's state cache."""

    def __init__(self, config: TalanConfig, prefix: str, max_num_seqs: int):
        super().__init__()
        self.config = config
        self.prefix = prefix
        # fp32 weights whatever the host dtype: the checkpoint and the reference are fp32.
        self.block = TalanBlock(config).float()
        self.block.requires_grad_(False)
        # Per-request on/off flags by batch row (decode rows first), filled by the
        # TalanSwitch logits processor; all on when nobody writes them.
        self.register_buffer(
            "enabled_rows", torch.ones(max_num_seqs, dtype=torch.bool), persistent=False
        )
        switch.register_layer(self)

        vllm_config = _compat.current_vllm_config()
        context = vllm_config.compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        context[prefix] = self
        self.kv_cache = (torch.tensor([]),)

    # --- MambaBase ------------------------------------------------------------------------

    def get_state_shape(self) -> tuple[tuple[int, ...]]:
        return ((self.config.n_themes, self.config.hidden_size + 1),)

    def get_state_dtype(self) -> tuple[torch.dtype]:
        return (torch.float32,)

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
        delta = torch.empty_like(stream)
        getattr(torch.ops, _compat.OP_NAMESPACE).talan_side_path(stream, delta, self.prefix)
        return stream + delta

    def side_path(self, stream: torch.Tensor, delta_out: torch.Tensor) -> None:
        """Write ``X~ - X`` (zero for disabled requests and padding) into ``delta_out``."""
        metadata = _compat.forward_context().attn_metadata
        if isinstance(metadata, dict):
            metadata = metadata.get(self.prefix)
        if metadata is None:
            # Profiling / dummy run: one fresh sequence, so memory use is realistic.
            cu = torch.tensor([0, stream.shape[0]], device=stream.device, dtype=torch.long)
            delta, _ = self.block.perturbation(stream, cu)
            delta_out.copy_(delta.to(delta_out.dtype))
            return

        states = self.kv_cache[0]
        num_decodes, num_prefills = metadata.num_decodes, metadata.num_prefills
        if num_prefills == 0:
            # Decode only: static shapes over the (possibly graph-padded) decode rows.
            slots = metadata.state_indices_tensor_d[:, 0].long()
            resume = metadata.has_initial_states_d
            num_seqs = num_tokens = slots.shape[0]
            cu_seqlens = None  # the block's decode-step entry: one token per sequence
            token_seq = None
        else:
            prefill_slots = metadata.state_indices_tensor_p.long()
            prefill_starts = metadata.query_start_loc_p.long() + metadata.num_decode_tokens
            if num_decodes:
                slots = torch.cat([metadata.state_indices_tensor_d[:, 0].long(), prefill_slots])
                resume = torch.cat([metadata.has_initial_states_d, metadata.has_initial_states_p])
                decode_starts = torch.arange(
                    num_decodes, device=stream.device, dtype=torch.long
                )
                cu_seqlens = torch.cat([decode_starts, prefill_starts])
            else:
                slots, resume = prefill_slots, metadata.has_initial_states_p
                cu_seqlens = prefill_starts
            num_seqs = num_decodes + num_prefills
            num_tokens = metadata.num_decode_tokens + metadata.num_prefill_tokens
            token_seq = sequence_index(cu_seqlens, num_tokens)

        hidden = stream[:num_tokens]
        stored = states.index_select(0, slots)
        # where(), not a product: a never-written slot may hold NaN garbage.
        initial = torch.where(resume.view(-1, 1, 1), stored, torch.zeros_like(stored))
        delta, final = self.block.perturbation(hidden, cu_seqlens, initial)

        enabled = self.enabled_rows[:num_seqs]
        enabled_tokens = enabled if token_seq is None else enabled[token_seq]
        # A disabled request is the adapter-only model: exact identity, state untouched.
        delta = torch.where(enabled_tokens.view(-1, 1), delta, torch.zeros_like(delta))
        final = torch.where(enabled.view(-1, 1, 1), final, initial)
        states.index_copy_(0, slots, final)

        delta_out[:num_tokens].copy_(delta.to(delta_out.dtype))
        delta_out[num_tokens:].zero_()


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
        context = _compat.current_vllm_config().compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        context[prefix] = self
        self.kv_cache = (torch.tensor([]),)

    get_state_shape = TalanStateLayer.get_state_shape
    get_state_dtype = TalanStateLayer.get_state_dtype
    mamba_type = TalanStateLayer.mamba_type
    get_attn_backend = TalanStateLayer.get_attn_backend
    is_kv_cache_tp_replicated = TalanStateLayer.is_kv_cache_tp_replicated


def _talan_side_path(stream: torch.Tensor, delta: torch.Tensor, layer_name: str) -> None:
    layer = _compat.forward_context().no_compile_layers[layer_name]
    layer.side_path(stream, delta)


_compat.register_custom_op(_talan_side_path, mutates_args=["delta"])
