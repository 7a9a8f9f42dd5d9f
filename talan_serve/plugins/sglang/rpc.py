"""Loading and unloading TALAN adapters in a running SGLang engine.

The front end calls ``Engine.collective_rpc("talan_load_adapter", ...)``, which SGLang
delivers to every scheduler of the engine (each tensor-parallel rank) as a method call on
the scheduler, followed by a barrier. A hook around the scheduler's RPC handler (SGLang's
``HookRegistry``) answers the ``talan_*`` methods with ``TalanSchedulerRpc``; the model's
``SidePath.load`` validates the checkpoint and adds its block, so an adapter loaded now
runs exactly as one loaded at start.
"""

from __future__ import annotations

import json
from typing import Any

from talan_serve.plugins.sglang import _compat

METHODS = ("talan_load_adapter", "talan_add_adapter", "talan_unload_adapter",
           "talan_apply_changes")
FAILED_CHANGES = "talan_changes_failed"  # the key of a failed call's message (JSON)


class TalanSchedulerRpc:
    """A scheduler with the ``talan_*`` RPC methods; everything else is the scheduler's."""

    def __init__(self, scheduler: Any):
        self._scheduler = scheduler

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scheduler, name)

    def _model(self) -> Any:
        return self._scheduler.tp_worker.model_runner.model

    def _talan_layer(self) -> Any:
        return getattr(self._model(), "talan", None)

    def talan_load_adapter(self, adapter: int, checkpoint_dir: str) -> None:
        layer = self._talan_layer()
        if layer is None:  # every connection point is on another pipeline stage
            return
        layer.side_path.load(adapter, checkpoint_dir, next(self._model().parameters()).device)

    def talan_add_adapter(self, adapter: int, config: dict, weights: bytes) -> None:
        """Add a TALAN block the server has validated, as ``adapter``: its config and its
        weights file's safetensors bytes (``AdapterWeights.talan_file``)."""
        from talan_serve.adapter_files import tensors_from_bytes
        from talan_serve.config import TalanConfig

        layer = self._talan_layer()
        if layer is None:  # every connection point is on another pipeline stage
            return
        layer.side_path.add(adapter, TalanConfig.from_dict(config),
                            tensors_from_bytes(weights), next(self._model().parameters()).device)

    def talan_unload_adapter(self, adapter: int) -> None:
        layer = self._talan_layer()
        if layer is not None:
            layer.side_path.unload(adapter)

    def talan_apply_changes(self, changes: list) -> None:
        """Changes to the TALAN blocks in one call (one wait for the scheduler's gap
        between steps, however many loads wait): each ``[remove, add]``, an adapter id and
        ``[adapter, config, weights]`` as for ``talan_add_adapter``, either None. Each is
        applied whether or not another fails; the failures come back together, by index
        (``failed_changes``)."""
        failed = {}
        for index, (remove, add) in enumerate(changes):
            try:
                if remove is not None:
                    self.talan_unload_adapter(remove)
                if add is not None:
                    self.talan_add_adapter(*add)
            except Exception as error:  # reported to the front end, the others kept
                failed[index] = f"{type(error).__name__}: {error}"
        if failed:
            raise RuntimeError(json.dumps({FAILED_CHANGES: failed}))


def failed_changes(message: str) -> dict[int, str] | None:
    """The failures of a ``talan_apply_changes`` call by change index, from the message a
    failed call returns; None when the call failed as a whole (another message)."""
    try:
        failed = json.loads(message)[FAILED_CHANGES]
    except (ValueError, TypeError, KeyError):
        return None
    return {int(index): reason for index, reason in failed.items()}


class _Parameters(dict):
    """An RPC's parameters, shown by their names: SGLang formats every call's parameters
    into a log line, logged or not, and a TALAN block's weights are hundreds of kB, which
    the scheduler would format between two steps (docs/design.md, "The SGLang plugin")."""

    def __repr__(self) -> str:
        return f"<{', '.join(self)}>"


def _around_rpc(original, scheduler, recv_req, *args, **kwargs):
    if getattr(recv_req, "method", None) in METHODS:
        if recv_req.parameters is not None:
            recv_req.parameters = _Parameters(recv_req.parameters)
        # SGLang's handler looks the method up on its first argument, then syncs the ranks.
        return original(TalanSchedulerRpc(scheduler), recv_req, *args, **kwargs)
    return original(scheduler, recv_req, *args, **kwargs)


def register_hooks() -> None:
    _compat.register_hook("scheduler_rpc", _around_rpc, "AROUND")
