"""Monkeypatches for what a plugin cannot reach; each names the upstream version it targets.

``apply_vllm`` is a vLLM general plugin of its own (entry point ``talan_patches``), so it
runs in every vLLM process beside the TALAN plugin, which never imports this package.
``apply_deepspeed`` runs in every training process of a DeepSpeed run (training/run.py).
"""

from __future__ import annotations


def apply_vllm() -> list[str]:
    """Apply the vLLM patches that fit the running vLLM; the names of those applied."""
    from patches import vllm_cpu_lora_mixed_batch, vllm_cpu_pp_eager, vllm_talan_prefix_cache_key

    applied = ["vllm_talan_prefix_cache_key"] if vllm_talan_prefix_cache_key.apply() else []
    if vllm_cpu_lora_mixed_batch.apply():
        applied.append("vllm_cpu_lora_mixed_batch")
    if vllm_cpu_pp_eager.apply():
        applied.append("vllm_cpu_pp_eager")
    return applied


def apply_deepspeed() -> list[str]:
    """Apply the DeepSpeed patches that fit the installed DeepSpeed; those applied."""
    from patches import deepspeed_scalar_broadcast

    return ["deepspeed_scalar_broadcast"] if deepspeed_scalar_broadcast.apply() else []
