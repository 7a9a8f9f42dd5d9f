"""TALAN inside vLLM: a general plugin (entry point ``vllm.general_plugins: talan``).

``register()`` runs in every vLLM process (front end, engine core, workers). It adds a
``Talan<Host>`` architecture for each host of ``talan_serve.hosts``, all made by one
mixin over vLLM's own class (``model.py``, on ``talan_serve.engine``), and the config hook
that makes vLLM treat them as hybrid models with a per-request state (``layer.py``,
``state_backend.py``) and reads each row's switch (``rows.py``).

Serve a folder written by ``talan_serve.prepared.prepare_model_dir``; switch TALAN off
for one request with ``SamplingParams(extra_args=talan_serve.switch.switch_args(False))``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def register() -> None:
    from talan_serve.hosts import TALAN_ARCHITECTURES
    from talan_serve.plugins.vllm._compat import MODELS_CONFIG_MAP, ModelRegistry
    from talan_serve.plugins.vllm.model import TalanHybridConfig

    supported = set(ModelRegistry.get_supported_archs())
    for arch in TALAN_ARCHITECTURES:
        if arch not in supported:
            ModelRegistry.register_model(arch, f"talan_serve.plugins.vllm.model:{arch}")
        MODELS_CONFIG_MAP[arch] = TalanHybridConfig


CHECKPOINT_LORA_NAME = "talan-lora"
CHECKPOINT_LORA_ID = 1


def lora_request_for(name: str, lora_id: int, lora_dir: str | Path) -> Any:
    """vLLM's ``LoRARequest`` for the PEFT files in ``lora_dir``."""
    from talan_serve.plugins.vllm._compat import LoRARequest

    return LoRARequest(name, lora_id, str(lora_dir))


def checkpoint_lora(lora_dir: str | Path) -> Any:
    """The ``LoRARequest`` of a one-checkpoint server's LoRA, served per request."""
    return lora_request_for(CHECKPOINT_LORA_NAME, CHECKPOINT_LORA_ID, lora_dir)


def lora_request(prepared: Any) -> Any:
    """vLLM's ``LoRARequest`` for a prepared folder's unmerged LoRA (None: none)."""
    return None if prepared.lora_dir is None else checkpoint_lora(prepared.lora_dir)


def lora_rank_for(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds a LoRA of ``rank``."""
    from talan_serve.plugins.vllm._compat import lora_rank_for as engine_rank

    return engine_rank(rank)


def max_lora_rank(prepared: Any) -> int:
    """``max_lora_rank`` for serving a prepared folder's LoRA."""
    return lora_rank_for(prepared.lora_rank or 1)
