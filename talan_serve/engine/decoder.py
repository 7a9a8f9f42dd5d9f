"""The decoder-layer swap: the side path at a connection point, for any engine.

At the connection point the decoder layer's class is swapped in place for a one-method
subclass, so parameter names, LoRA targets, weight loading and the pipeline split do not
change: before decoder layer 0 for ``embedding``, after decoder layer N for ``layer_N``
(``embedding`` and ``layer_0`` may both sit on layer 0). The subclass's ``forward`` is the
engine's (``forward_for``): it knows how the engine's layers hand the residual stream on.
It reads ``self._talan_before`` / ``self._talan_after`` (the point, or None) and
``self._talan_side_path`` (whatever handle the engine's forward needs to reach its state
layer), set here as plain attributes, not submodules.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from talan_serve.config import connection_layer

# A decoder layer class -> its subclass with the side path (one per class, any engine).
_SWAPPED: dict[type, type] = {}


def _swapped_class(layer_cls: type, forward_for: Callable[[type], Callable]) -> type:
    if layer_cls not in _SWAPPED:
        _SWAPPED[layer_cls] = type(f"Talan{layer_cls.__name__}", (layer_cls,), {
            "forward": forward_for(layer_cls),
            "__module__": layer_cls.__module__,
            "_talan_before": None,
            "_talan_after": None,
        })
    return _SWAPPED[layer_cls]


def install_side_path(decoder: nn.Module, point: str, handle: object,
                      forward_for: Callable[[type], Callable]) -> bool:
    """Swap the class of ``decoder``'s layer at connection ``point``; False when that
    layer lives on another pipeline stage.

    ``forward_for(layer_cls)`` makes the subclass's forward from the layer's own class;
    ``handle`` is what that forward reads to reach the side path.
    """
    index = connection_layer(point)
    target = decoder.layers[0 if index is None else index]
    if type(target).__name__ == "PPMissingLayer":  # vLLM's and SGLang's stand-in
        return False
    if type(target) not in _SWAPPED.values():
        target.__class__ = _swapped_class(type(target), forward_for)
    object.__setattr__(target, "_talan_before" if index is None else "_talan_after", point)
    object.__setattr__(target, "_talan_side_path", handle)
    return True
