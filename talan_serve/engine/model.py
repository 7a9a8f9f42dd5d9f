"""``Talan<Host>``: an engine's own causal-LM class plus the side path, for any engine.

``TalanQwen3ForCausalLM`` *is* the engine's ``Qwen3ForCausalLM`` (same ``__init__``,
weights, LoRA targets, pipeline split, compilation) with the mixin below in front: after
the host's ``__init__`` the engine's plugin calls ``_attach_talan``, which builds the
adapter set the prepared folder asks for (``talan_serve.prepared``), wraps it in the
engine's state layer (``self.talan``) and swaps the decoder layer at each connection point
(``talan_serve.engine.decoder``); ``load_weights`` loads the host's weights, then a
one-checkpoint folder's TALAN block as adapter 0. A base for many adapters starts with
empty stacks, filled at run time (``SidePath.load``). Nothing here knows a host or an
engine; ``class_builder`` makes the classes lazily from the host table
(``talan_serve.hosts``), since engines import their model modules on demand.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from talan_serve.adapter_set import TalanAdapterSet
from talan_serve.engine.decoder import install_side_path
from talan_serve.engine.side_path import SidePath
from talan_serve.hosts import host_of, talan_architecture
from talan_serve.prepared import adapter_set_spec_of, checkpoint_config_of, talan_weights_path
from talan_serve.switch import DEFAULT_ADAPTER

# The state layer's submodule; no checkpoint weight has this prefix (TALAN's weights come
# from the prepared folder's talan/ side, not from the engine's weight files).
LAYER_NAME = "talan"


def talan_weights_in(model_dirs: Iterable[str | Path | None]) -> Path:
    """The TALAN weights of the served folder: the first of ``model_dirs`` that has them."""
    tried = [str(d) for d in model_dirs if d]
    for folder in tried:
        if talan_weights_path(folder).is_file():
            return talan_weights_path(folder)
    raise FileNotFoundError(f"talan-serve: no TALAN weights in the model folder "
                            f"({', '.join(tried)})")


class TalanModelMixin:
    """Mixed in front of an engine's causal-LM class, through the engine's own subclass of
    this mixin (see the module docstring)."""

    talan_config = None  # one checkpoint's TALAN config; None on a base for many adapters

    def _attach_talan(
        self,
        hf_config: Any,
        model_dirs: Iterable[str | Path | None],
        make_layer: Callable[[SidePath], nn.Module],
        forward_for: Callable[[type], Callable],
        handle: Callable[[nn.Module], object] = lambda layer: layer,
    ) -> nn.Module | None:
        """Build the side path, the engine's state layer around it (``make_layer``) and
        the swapped decoder layers; the state layer, or None when every connection point
        lies on another pipeline stage (the model then runs without it)."""
        spec = adapter_set_spec_of(hf_config)
        spec.check_host(hf_config.hidden_size, hf_config.num_hidden_layers)
        self.talan_config = checkpoint_config_of(hf_config)
        self.talan_weights = (talan_weights_in(model_dirs) if self.talan_config is not None
                              else None)
        setattr(self, LAYER_NAME, make_layer(SidePath(TalanAdapterSet(spec))))
        layer = getattr(self, LAYER_NAME)
        installed = [install_side_path(self.model, point, handle(layer), forward_for)
                     for point in spec.connection_points]
        if not any(installed):
            delattr(self, LAYER_NAME)
            return None
        return layer

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Any:
        prefix = f"{LAYER_NAME}."
        result = super().load_weights((n, w) for n, w in weights if not n.startswith(prefix))
        layer = getattr(self, LAYER_NAME, None)
        if layer is None:
            return result
        device = next(self.parameters()).device
        layer.to(device)
        if self.talan_config is not None:
            layer.side_path.add(DEFAULT_ADAPTER, self.talan_config,
                                load_file(str(self.talan_weights)), device)
        if isinstance(result, set):
            # The adapters' weights come from their checkpoints (this one's above, or
            # loaded at run time into the stacks built empty), not from the engine's files.
            result |= {f"{prefix}{name}" for name, _ in layer.named_parameters()}
        return result


def class_builder(namespace: dict[str, Any], mixin: type, host_modules: Mapping[str, str],
                  extra_bases: tuple[type, ...] = ()) -> Callable[[str], type]:
    """``build(architecture)``: the ``Talan<Host>`` class of ``mixin`` over the engine's
    host class (imported from ``host_modules`` on first use), kept in ``namespace`` (the
    plugin's model module, so that the class can be found by name again)."""

    def build(architecture: str) -> type:
        host = host_of(architecture)
        if host is None or host not in host_modules:
            raise AttributeError(architecture)
        host_cls = getattr(importlib.import_module(host_modules[host]), host)
        cls = type(talan_architecture(host), (mixin, host_cls, *extra_bases),
                   {"__module__": namespace["__name__"]})
        namespace[architecture] = cls
        return cls

    return build
