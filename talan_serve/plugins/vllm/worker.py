"""Loading and unloading TALAN adapters in a running vLLM engine.

vLLM mixes ``TalanWorkerExtension`` into its worker class (``worker_extension_cls``, set
by the TALAN config hook), so the front end reaches every worker (each tensor-parallel
rank, each pipeline stage) with ``collective_rpc("talan_load_adapter", ...)``. The
adapter's block joins the TALAN layer's ``TalanAdapterSet``; nothing else in the engine
changes, so an adapter loaded now runs exactly as one loaded at start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from talan_serve.checkpoint import WEIGHTS_NAME
from talan_serve.config import TalanConfig

WORKER_EXTENSION = "talan_serve.plugins.vllm.worker.TalanWorkerExtension"


class TalanWorkerExtension:
    """Methods vLLM adds to its worker; ``self`` is the worker."""

    def _talan_layers(self) -> list[Any]:
        from talan_serve.plugins.vllm.layer import TalanStateLayer

        context = self.vllm_config.compilation_config.static_forward_context
        return [layer for layer in context.values() if isinstance(layer, TalanStateLayer)]

    def talan_load_adapter(self, adapter: int, checkpoint_dir: str) -> None:
        """Load a checkpoint's TALAN block as ``adapter`` (its LoRA is vLLM's business)."""
        config = TalanConfig.load(Path(checkpoint_dir))
        weights = load_file(str(Path(checkpoint_dir) / WEIGHTS_NAME))
        for layer in self._talan_layers():
            layer.adapters.add(adapter, config, weights, device=layer.row_adapter_buffer.device)
            layer.adapters_changed()

    def talan_unload_adapter(self, adapter: int) -> None:
        for layer in self._talan_layers():
            layer.adapters.remove(adapter)
            layer.adapters_changed()

    def talan_loaded_adapters(self) -> list[int]:
        return sorted({int(key) for layer in self._talan_layers()
                       for key in layer.adapters.blocks})
