"""TALAN twins of SGLang's own causal-LM classes, made by one generic mixin.

``TalanQwen3ForCausalLM`` *is* SGLang's ``Qwen3ForCausalLM`` (same ``__init__``, weights,
LoRA targets, pipeline split) plus

* ``self.talan``: a ``TalanStateLayer`` (the TALAN adapters: one checkpoint's, or those
  of a server of many) whose state lives in SGLang's state pool;
* the decoder layer at each connection point gets a one-method subclass (its class is
  swapped in place, so parameter names, LoRA targets and weight loading do not change).
  ``embedding``: TALAN on the stream entering decoder layer 0. ``layer_N``: after decoder
  layer N, SGLang's residual stream ``fold`` gives the full stream ``X = hidden +
  residual`` (tensor-parallel reduction included), TALAN gives ``X + delta``, and
  ``set_written`` hands it on as the next layer's residual.

The same mixin serves Qwen3, Qwen3-MoE, Qwen2 and Llama: nothing here knows a host.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file

from talan_serve.config import connection_layer
from talan_serve.plugins.sglang import _compat
from talan_serve.plugins.sglang.config import state_layer_id, upgraded
from talan_serve.prepared import (
    CONFIG_KEY,
    adapter_set_spec_of,
    checkpoint_config_of,
    talan_architecture,
    talan_weights_path,
)
from talan_serve.switch import DEFAULT_ADAPTER

_PATCHED_LAYER_CLASSES: dict[tuple[type, str], type] = {}


def _with_side_path(layer_cls: type, where: str) -> type:
    """``layer_cls`` with the TALAN side path before (``embedding``) or after its forward."""
    key = (layer_cls, where)
    if key in _PATCHED_LAYER_CLASSES:
        return _PATCHED_LAYER_CLASSES[key]
    fold, set_written = _compat.resolve("residual_fold"), _compat.resolve("residual_set_written")

    if where == "before":

        def forward(self, positions, hidden_states, forward_batch, *args, **kwargs):
            stream = forward_batch.residual_stream
            if stream is not None and stream.residual is None and stream.pending is None:
                # A fresh layer stack: hidden_states is the whole stream.
                hidden_states = self._talan_layer(hidden_states, forward_batch,
                                                  self._talan_before)
            else:  # a stream handed over (pipeline stage): fold it first
                hidden_states = set_written(
                    self._talan_layer(fold(hidden_states, forward_batch), forward_batch,
                                      self._talan_before),
                    forward_batch)
            return layer_cls.forward(self, positions, hidden_states, forward_batch, *args,
                                     **kwargs)

    else:

        def forward(self, positions, hidden_states, forward_batch, *args, **kwargs):
            out = layer_cls.forward(self, positions, hidden_states, forward_batch, *args,
                                    **kwargs)
            stream = fold(out, forward_batch)
            return set_written(self._talan_layer(stream, forward_batch, self._talan_after),
                               forward_batch)

    patched = type(f"Talan{where.capitalize()}{layer_cls.__name__}", (layer_cls,),
                   {"forward": forward, "__module__": __name__})
    _PATCHED_LAYER_CLASSES[key] = patched
    return patched


def install_side_path(decoder: torch.nn.Module, point: str,
                      talan_layer: torch.nn.Module) -> bool:
    """Swap the class of the decoder layer at connection ``point`` (False: another
    pipeline stage holds it). ``embedding`` and ``layer_0`` may both be on layer 0."""
    index = connection_layer(point)
    position, where = (0, "before") if index is None else (index, "after")
    target = decoder.layers[position]
    if type(target).__name__ == "PPMissingLayer":
        return False
    target.__class__ = _with_side_path(type(target), where)
    # Plain attributes, not submodules: parameter names do not change.
    object.__setattr__(target, "_talan_layer", talan_layer)
    object.__setattr__(target, f"_talan_{where}", point)
    return True


class TalanModelMixin:
    """Mixed in front of an SGLang causal-LM class; see the module docstring."""

    def __init__(self, config, *args, **kwargs):
        from talan_serve.plugins.sglang.guards import check_runtime
        from talan_serve.plugins.sglang.layer import TalanStateLayer

        check_runtime()
        upgraded(config)
        super().__init__(config, *args, **kwargs)
        spec = adapter_set_spec_of(config)
        spec.check_host(config.hidden_size, config.num_hidden_layers)
        # One checkpoint: adapter 0, loaded with the weights. A base for many adapters
        # starts with empty stacks; rpc.py loads the adapters.
        self.talan_config = checkpoint_config_of(config)
        self.talan_weights = _weights_path(config) if self.talan_config is not None else None
        self.talan = TalanStateLayer(spec.build(), layer_id=state_layer_id(spec))
        installed = [install_side_path(self.model, point, self.talan)
                     for point in spec.connection_points]
        if not any(installed):
            del self.talan  # every connection point is on another pipeline stage

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        prefix = f"{CONFIG_KEY}."
        result = super().load_weights((n, w) for n, w in weights if not n.startswith(prefix))
        if hasattr(self, "talan"):
            device = next(self.parameters()).device
            self.talan.to(device)
            if self.talan_config is not None:
                state_dict = load_file(str(self.talan_weights))
                self.talan.adapters.add(DEFAULT_ADAPTER, self.talan_config, state_dict,
                                        device=device)
            if isinstance(result, set):
                result |= {f"{prefix}{name}" for name, _ in self.talan.named_parameters()}
        return result


def _weights_path(config) -> Path:
    """The TALAN weights of the served folder (the config's own path, or SGLang's)."""
    candidates = [getattr(config, "_name_or_path", None)]
    try:
        candidates.append(_compat.resolve("runtime_model")().model_path)
    except Exception:  # noqa: BLE001 - no published context
        pass
    for folder in filter(None, candidates):
        if talan_weights_path(folder).is_file():
            return talan_weights_path(folder)
    raise FileNotFoundError(f"talan-serve: no TALAN weights in the model folder "
                            f"({', '.join(map(str, filter(None, candidates)))})")


def talan_model_class(host_cls: type) -> type:
    return type(talan_architecture(host_cls.__name__), (TalanModelMixin, host_cls),
                {"__module__": __name__})


def _build(arch: str) -> type:
    for host, module in _compat.HOST_MODULES.items():
        if arch == talan_architecture(host):
            cls = talan_model_class(getattr(importlib.import_module(module), host))
            globals()[arch] = cls
            return cls
    raise AttributeError(arch)


def __getattr__(name: str) -> type:
    if name in _compat.TALAN_ARCHITECTURES:
        return _build(name)
    raise AttributeError(name)


# SGLang's external model package reads EntryClass.
EntryClass = [_build(arch) for arch in _compat.TALAN_ARCHITECTURES]
