"""Loading and unloading TALAN adapters in a running vLLM engine.

vLLM mixes ``TalanWorkerExtension`` into its worker class (``worker_extension_cls``, set
by the TALAN config hook), so the front end reaches every worker (each tensor-parallel
rank, each pipeline stage) with ``collective_rpc("talan_load_adapter", ...)``. Each state
layer's ``SidePath.load`` validates the checkpoint and adds its block; nothing else in the
engine changes, so an adapter loaded now runs exactly as one loaded at start.
"""

from __future__ import annotations

from typing import Any

WORKER_EXTENSION = "talan_serve.plugins.vllm.worker.TalanWorkerExtension"


class TalanWorkerExtension:
    """Methods vLLM adds to its worker; ``self`` is the worker."""

    def _talan_layers(self) -> list[Any]:
        from talan_serve.plugins.vllm.layer import VllmStateLayer

        context = self.vllm_config.compilation_config.static_forward_context
        return [layer for layer in context.values() if isinstance(layer, VllmStateLayer)]

    def talan_load_adapter(self, adapter: int, checkpoint_dir: str) -> None:
        """Load a checkpoint's TALAN block as ``adapter`` (its LoRA is vLLM's business)."""
        for layer in self._talan_layers():
            layer.side_path.load(adapter, checkpoint_dir, layer.row_adapter_buffer.device)

    def talan_add_adapter(self, adapter: int, config: dict, weights: bytes) -> None:
        """Add a TALAN block the server has validated, as ``adapter``: its config and
        its weights file's safetensors bytes (``AdapterWeights.talan_file``)."""
        from talan_serve.adapter_files import tensors_from_bytes
        from talan_serve.config import TalanConfig

        talan_config, tensors = TalanConfig.from_dict(config), tensors_from_bytes(weights)
        for layer in self._talan_layers():
            layer.side_path.add(adapter, talan_config, tensors,
                                layer.row_adapter_buffer.device)

    def talan_add_lora(self, lora_id: int, config: dict, weights: bytes) -> None:
        """Add a LoRA the server has validated (PEFT's config, its tensors as safetensors
        bytes) to this worker's LoRA cache as ``lora_id``."""
        from talan_serve.adapter_files import tensors_from_bytes
        from talan_serve.plugins.vllm._compat import add_lora_tensors

        add_lora_tensors(self, lora_id, config, tensors_from_bytes(weights))

    def talan_change_adapters(self, remove: list | None, add: list | None) -> None:
        """Remove one adapter and add one, in one call, which the engine serves between
        two steps (one wait for a step instead of one per part).

        ``remove``: ``[id, has_talan, has_lora]``; ``add``: ``[id, talan, lora]``, each of
        ``talan`` and ``lora`` None or ``[config, safetensors bytes]`` (as for
        ``talan_add_adapter`` and ``talan_add_lora``). A failed add leaves nothing of it."""
        if remove is not None:
            adapter, has_talan, has_lora = remove
            if has_talan:
                self.talan_unload_adapter(adapter)
            if has_lora:
                self.remove_lora(adapter)
        if add is None:
            return
        adapter, talan, lora = add
        if talan is not None:
            self.talan_add_adapter(adapter, *talan)
        try:
            if lora is not None:
                self.talan_add_lora(adapter, *lora)
        except BaseException:
            if talan is not None:
                self.talan_unload_adapter(adapter)
            raise

    def talan_unload_adapter(self, adapter: int) -> None:
        for layer in self._talan_layers():
            layer.side_path.unload(adapter)

    def talan_loaded_adapters(self) -> list[int]:
        return sorted({a for layer in self._talan_layers() for a in layer.side_path.loaded()})
