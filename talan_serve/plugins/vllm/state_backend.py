"""TALAN's per-step state metadata: state indices, "resumes a state", sequence offsets.

vLLM keeps its state layers apart from their metadata builders; so does this plugin.
Unlike vLLM's mamba kernels, the TALAN block takes requests in any order, so the batch
is never reordered and never split into decodes and prefills: the metadata is a few
tensors over vLLM's common metadata (both measurably cost per step;
bench/results/vllm_step_parts_cpu.md).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from talan_serve.plugins.vllm._compat import (
    AttentionCGSupport,
    AttentionMetadataBuilder,
    ShortConvAttentionBackend,
    mamba_get_block_table_tensor,
)
from talan_serve.plugins.vllm.batch import VllmStateMetadata


class VllmStateMetadataBuilder(AttentionMetadataBuilder[VllmStateMetadata]):
    """State indices and resume flags from vLLM's common metadata; no batch reordering."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH
    reorder_batch_threshold: int | None = None

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.mamba_cache_mode = vllm_config.cache_config.mamba_cache_mode
        compilation = vllm_config.compilation_config
        self.full_graphs = compilation.cudagraph_mode.has_full_cudagraphs()
        max_bs = vllm_config.scheduler_config.max_num_seqs
        if compilation.max_cudagraph_capture_size is not None:
            max_bs = min(max_bs, compilation.max_cudagraph_capture_size)
        # Full CUDA graphs replay fixed addresses: one-token steps read these buffers.
        self.indices_buffer = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.resume_buffer = torch.zeros(max_bs, dtype=torch.bool, device=device)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False, **kwargs):
        return self._build(common_attn_metadata, capture=False)

    def build_for_cudagraph_capture(self, common_attn_metadata):
        return self._build(common_attn_metadata, capture=True)

    def _build(self, m, capture: bool) -> VllmStateMetadata:
        num_reqs = m.num_reqs
        indices = mamba_get_block_table_tensor(
            m.block_table_tensor, m.seq_lens, self.kv_cache_spec, self.mamba_cache_mode
        )[:num_reqs, 0].long()
        cu_seqlens_cpu = None
        if m.max_query_len == 1:
            # One token per request (graph padding rows: seq_len 0, the null block).
            cu_seqlens = None
            # The usual decode step: every request continues its state, seen on the CPU,
            # so the side path skips its per-row mask. Graphs are captured with the mask and
            # read the buffers below on replay, so those are filled either way.
            skip_mask = not capture and _all_continue(m.seq_lens_cpu_upper_bound, num_reqs)
            resume = None if skip_mask and not self.full_graphs else m.seq_lens[:num_reqs] > 1
            if self.full_graphs and num_reqs <= self.indices_buffer.shape[0]:
                self.indices_buffer[:num_reqs].copy_(indices, non_blocking=True)
                self.resume_buffer[:num_reqs].copy_(resume, non_blocking=True)
                indices, resume = self.indices_buffer[:num_reqs], self.resume_buffer[:num_reqs]
            if skip_mask:
                resume = None
        else:
            resume = m.compute_num_computed_tokens()[:num_reqs] > 0
            cu_seqlens = m.query_start_loc[: num_reqs + 1].long()
            cu_seqlens_cpu = m.query_start_loc_cpu[: num_reqs + 1].numpy()
        return VllmStateMetadata(
            num_reqs=num_reqs, num_tokens=m.num_actual_tokens, state_indices=indices,
            resume=resume, cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu,
        )


def _all_continue(seq_lens_cpu: torch.Tensor | None, num_reqs: int) -> bool:
    """CPU-side: does every request of a one-token step continue a state (no sync)?"""
    # numpy: a third of the cost of the same reduction as torch ops, per step.
    return seq_lens_cpu is not None and bool(seq_lens_cpu.numpy()[:num_reqs].min() > 1)


class VllmStateBackend(ShortConvAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "TALAN_STATE"

    @staticmethod
    def get_builder_cls() -> type[VllmStateMetadataBuilder]:
        return VllmStateMetadataBuilder
