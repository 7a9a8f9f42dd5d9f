"""One vLLM step as the side path sees it: the metadata, and the step batch made of it.

Kept apart from vLLM's classes (no vLLM import), so that ``bench/gpu_block_check.py``
builds a vLLM decode step exactly as the layer does and captures it where vLLM is absent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from talan_serve.engine.side_path import StepBatch


@dataclass
class VllmStateMetadata:
    """One step's view of the batch, rows in vLLM's input-batch order."""

    num_reqs: int
    num_tokens: int
    # (num_reqs,) int64 each request's state index in the state cache.
    state_indices: torch.Tensor
    # (num_reqs,) bool: the request continues a state (False: a first chunk, or padding);
    # None when every request of an eager one-token step does (nothing to mask).
    resume: torch.Tensor | None
    # (num_reqs + 1,) int64 token offsets; None when each request brings exactly one token.
    cu_seqlens: torch.Tensor | None
    # The same offsets on the CPU, for grouping rows by adapter without a device sync.
    cu_seqlens_cpu: np.ndarray | None = None


def step_batch(metadata: VllmStateMetadata, states: torch.Tensor, rows_cpu: np.ndarray,
               row_buffer: torch.Tensor) -> StepBatch:
    """The ``StepBatch`` of one step: vLLM's metadata, the layer's state cache, and each
    row's adapter id (``rows_cpu`` for the plan; ``row_buffer``, fixed-address, for graphs)."""
    num_reqs, cu_seqlens = metadata.num_reqs, metadata.cu_seqlens
    return StepBatch(
        states=states, indices=metadata.state_indices,
        # One token per request: static shapes over the (possibly graph-padded) rows.
        num_tokens=num_reqs if cu_seqlens is None else metadata.num_tokens,
        cu_seqlens=cu_seqlens, cu_seqlens_cpu=metadata.cu_seqlens_cpu,
        resume=metadata.resume, rows_cpu=rows_cpu,
        rows_device=lambda: row_buffer[:num_reqs])
