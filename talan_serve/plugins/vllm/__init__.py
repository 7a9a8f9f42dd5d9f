"""TALAN inside vLLM: a general plugin (entry point ``vllm.general_plugins: talan``).

``register()`` runs in every vLLM process (front end, engine core, workers). It adds a
``Talan<Host>`` architecture for each supported host (Qwen3, Qwen3-MoE, Qwen2, Llama),
all made by one mixin over vLLM's own class (``model.py``), and the config hook that
makes vLLM treat them as hybrid models with a per-request state (``layer.py``,
``state_backend.py``) and adds the per-request switch (``switch.py``).

Serve a folder written by ``talan_serve.prepared.prepare_model_dir``; switch TALAN off
for one request with ``SamplingParams(extra_args=talan_serve.switch.switch_args(False))``.
"""

from __future__ import annotations

from typing import Any


def register() -> None:
    from talan_serve.plugins.vllm._compat import HOST_MODULES, MODELS_CONFIG_MAP, ModelRegistry
    from talan_serve.plugins.vllm.model import TalanHybridConfig
    from talan_serve.prepared import talan_architecture

    supported = set(ModelRegistry.get_supported_archs())
    for host in HOST_MODULES:
        arch = talan_architecture(host)
        if arch not in supported:
            ModelRegistry.register_model(arch, f"talan_serve.plugins.vllm.model:{arch}")
        MODELS_CONFIG_MAP[arch] = TalanHybridConfig


def lora_request(prepared: Any, name: str = "talan-lora", lora_id: int = 1) -> Any:
    """vLLM's ``LoRARequest`` for a prepared folder's unmerged adapter (None: none)."""
    if prepared.lora_dir is None:
        return None
    from talan_serve.plugins.vllm._compat import LoRARequest

    return LoRARequest(name, lora_id, str(prepared.lora_dir))


def max_lora_rank(prepared: Any) -> int:
    """``max_lora_rank`` for serving a prepared folder's adapter (one of vLLM's slots)."""
    from talan_serve.plugins.vllm._compat import lora_rank_slot

    return lora_rank_slot(prepared.lora_rank or 1)
