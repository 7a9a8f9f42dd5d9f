"""TALAN twins of vLLM's own model classes, made by one generic mechanism.

``TalanQwen3ForCausalLM`` *is* vLLM's ``Qwen3ForCausalLM`` (same ``__init__``, weights,
LoRA, pipeline split, torch.compile) plus three things:

* a ``TalanStateLayer`` (``self.talan``) whose state vLLM caches per request;
* the decoder layer at the connection point gets a one-method subclass (its class is
  swapped in place, so parameter names, LoRA targets and weight loading do not change)
  that runs the side path on the full residual stream: before decoder layer 0 for
  ``embedding``, after decoder layer N for ``layer_N``. vLLM's decoder layers return
  ``(hidden, residual)`` with the stream ``X = hidden + residual``; the subclass returns
  ``(delta, X)``, which the next layer's fused add-norm turns into ``X + delta`` exactly;
* the hybrid-model interface (``IsHybrid``, ``HasInnerState``, mamba prefix caching) and
  a config hook that makes vLLM treat the model as hybrid.

The same mixin serves Qwen3, Qwen3-MoE, Qwen2 and Llama: nothing here knows a host.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from typing import Any

import torch
from safetensors.torch import load_file

from talan_serve.block import STATE_DTYPE
from talan_serve.config import connection_layer
from talan_serve.plugins import refusal
from talan_serve.plugins.vllm import _compat
from talan_serve.plugins.vllm._compat import (
    HasInnerState,
    IsHybrid,
    SupportsMambaPrefixCaching,
    VerifyAndUpdateConfig,
    get_temporal_copy_spec,
)
from talan_serve.prepared import (
    adapter_set_spec_of,
    checkpoint_config_of,
    talan_architecture,
    talan_weights_path,
)
from talan_serve.switch import DEFAULT_ADAPTER

LAYER_NAME = "talan"  # the state layer's submodule (not a weight prefix of the checkpoint)
LAYER_TYPE = "talan"  # TALAN's entry in the host config's layer_types
SWITCH_PROCESSOR = "talan_serve.plugins.vllm.switch:TalanSwitch"


# --- the connection points -----------------------------------------------------------------

_PATCHED_LAYER_CLASSES: dict[type, type] = {}


def _with_side_path(layer_cls: type) -> type:
    """``layer_cls`` that runs the TALAN side path before its forward (the ``embedding``
    point, on decoder layer 0) and/or after it (``layer_N``), as its instance says."""
    from talan_serve.plugins.vllm.layer import side_path_delta

    if layer_cls in _PATCHED_LAYER_CLASSES:
        return _PATCHED_LAYER_CLASSES[layer_cls]

    def forward(self, positions, hidden_states, residual, *args, **kwargs):
        if self._talan_before is not None:
            if residual is not None:  # only reachable through pipeline hand-over tensors
                hidden_states, residual = hidden_states + residual, None
            hidden_states = hidden_states + side_path_delta(
                self._talan_name, self._talan_before, hidden_states)
        hidden, residual = layer_cls.forward(
            self, positions, hidden_states, residual, *args, **kwargs
        )
        if self._talan_after is None:
            return hidden, residual
        stream = hidden + residual
        # Next: residual = delta + stream, i.e. X + delta with one rounding, like the
        # reference block's ``hidden + delta``.
        return side_path_delta(self._talan_name, self._talan_after, stream), stream

    patched = type(f"Talan{layer_cls.__name__}", (layer_cls,), {
        "forward": forward,
        "__module__": __name__,
        "_talan_before": None,
        "_talan_after": None,
    })
    _PATCHED_LAYER_CLASSES[layer_cls] = patched
    return patched


def install_side_path(decoder: torch.nn.Module, point: str, layer: torch.nn.Module) -> bool:
    """Swap the class of the decoder layer at connection ``point``.

    Returns False when that layer lives on another pipeline stage.
    """
    index = connection_layer(point)
    target = decoder.layers[0 if index is None else index]
    if type(target).__name__ == "PPMissingLayer":
        return False
    if type(target) not in _PATCHED_LAYER_CLASSES.values():
        target.__class__ = _with_side_path(type(target))
    if index is None:
        target._talan_before = point
    else:
        target._talan_after = point
    # The op finds the state layer by name in vLLM's forward context; the layer itself
    # stays a submodule of the model only (``talan``), so parameter names do not change.
    target._talan_name = layer.prefix
    return True


# --- the model mixin -----------------------------------------------------------------------


class TalanModelMixin:
    """Mixed in front of a vLLM causal-LM class; see the module docstring.

    The hybrid-model interfaces go after the host class in the bases (they are
    ``Protocol`` classes, whose ``__init__`` would otherwise shadow the host's).
    """

    is_hybrid = True
    has_inner_state = True
    supports_mamba_prefix_caching = True

    def __init__(self, *, vllm_config: Any, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        from talan_serve.plugins.vllm.layer import TalanStateLayer, TalanStatePlaceholder

        hf_config = vllm_config.model_config.hf_config
        # The config hook (TalanHybridConfig) has checked it against the host already.
        spec = adapter_set_spec_of(hf_config)
        # One checkpoint: adapter 0, loaded with the weights. A base for many adapters
        # starts empty; TalanWorkerExtension loads them.
        self.talan_config = checkpoint_config_of(hf_config)
        self.talan_weights = talan_weights_path(vllm_config.model_config.model)
        # vLLM orders state/KV caches by the one integer in a layer name; TALAN's state
        # takes the index after the last decoder layer (as vLLM's MTP layers do).
        name = f"{LAYER_NAME}.{hf_config.num_hidden_layers}"
        name = f"{prefix}.{name}" if prefix else name
        adapters = spec.build()
        self.talan = TalanStateLayer(
            adapters, prefix=name, max_num_seqs=vllm_config.scheduler_config.max_num_seqs
        )
        installed = [install_side_path(self.model, point, self.talan)
                     for point in spec.connection_points]
        if not any(installed):
            del self.talan  # every connection point is on another pipeline stage
            return
        # One KV-cache group for the attention layers, one for the state (see
        # TalanStatePlaceholder): N - 1 placeholders named after the decoder layers.
        num_layers = self.model.end_layer - self.model.start_layer
        base = f"{prefix}.{LAYER_NAME}" if prefix else LAYER_NAME
        self.talan_placeholders = [
            TalanStatePlaceholder(adapters, f"{base}_placeholder.{hf_config.num_hidden_layers + i}")
            for i in range(1, num_layers)
        ]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        host_weights = ((n, w) for n, w in weights if not n.startswith(f"{LAYER_NAME}."))
        loaded = set(super().load_weights(host_weights))
        if hasattr(self, "talan") and self.talan_config is not None:
            state_dict = load_file(str(self.talan_weights))
            self.talan.adapters.add(DEFAULT_ADAPTER, self.talan_config, state_dict,
                                    device=self.talan.row_adapter_buffer.device)
            self.talan.adapters_changed()
        if hasattr(self, "talan"):
            # The adapters' weights come from their checkpoints (this one's above, or
            # loaded at run time into the stacks built empty).
            loaded |= {f"{LAYER_NAME}.{name}" for name, _ in self.talan.named_parameters()}
        return loaded

    # --- hybrid-model interface (classmethods: vLLM sizes the cache before building) --

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: Any) -> tuple[tuple[int, int]]:
        return (adapter_set_spec_of(vllm_config.model_config.hf_config).state_shape,)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: Any) -> tuple[torch.dtype]:
        return (STATE_DTYPE,)

    @classmethod
    def get_mamba_state_copy_func(cls) -> tuple:
        # Align-mode prefix caching copies a whole per-request state block (no conv window).
        return (get_temporal_copy_spec,)


def talan_model_class(host_cls: type) -> type:
    bases = (TalanModelMixin, host_cls, HasInnerState, IsHybrid, SupportsMambaPrefixCaching)
    return type(talan_architecture(host_cls.__name__), bases, {"__module__": __name__})


def _host_class(architecture: str) -> type:
    return getattr(importlib.import_module(_compat.HOST_MODULES[architecture]), architecture)


def __getattr__(name: str) -> type:
    # TalanQwen3ForCausalLM etc. are built on first access (vLLM imports them lazily).
    for host in _compat.HOST_MODULES:
        if name == talan_architecture(host):
            cls = talan_model_class(_host_class(host))
            globals()[name] = cls
            return cls
    raise AttributeError(name)


# --- config hook ---------------------------------------------------------------------------


class TalanHybridConfig(VerifyAndUpdateConfig):
    """Runs inside vLLM's config construction for TALAN architectures."""

    @staticmethod
    def verify_and_update_model_config(model_config: Any) -> None:
        hf_config = model_config.hf_config
        adapter_set_spec_of(hf_config).check_host(hf_config.hidden_size,
                                                  hf_config.num_hidden_layers)
        # vLLM calls a model hybrid when its layer_types are not all attention. Like
        # vLLM's MTP support, append an entry past the decoder layers for TALAN's state.
        layer_types = list(getattr(hf_config, "layer_types", None) or
                           ["full_attention"] * hf_config.num_hidden_layers)
        if LAYER_TYPE not in layer_types:
            hf_config.layer_types = [*layer_types, LAYER_TYPE]
        if getattr(hf_config, "use_sliding_window", False):
            raise refusal("sliding-window attention")
        if hasattr(hf_config, "max_window_layers"):
            # Qwen2-family models assert this once layer_types hold several kinds.
            hf_config.max_window_layers = hf_config.num_hidden_layers
        # The off switch reaches the forward through this V1 logits processor.
        processors = list(model_config.logits_processors or [])
        if SWITCH_PROCESSOR not in processors:
            model_config.logits_processors = [*processors, SWITCH_PROCESSOR]
        if os.environ.get(_compat.V2_RUNNER_ENV, "0") not in ("0", "false", "False"):
            raise ValueError(
                "talan-serve: TALAN models run on vLLM's V1 model runner (the per-request "
                f"off switch uses its logits-processor hook); unset {_compat.V2_RUNNER_ENV}"
            )
        os.environ[_compat.V2_RUNNER_ENV] = "0"

    @classmethod
    def verify_and_update_config(cls, vllm_config: Any) -> None:
        if vllm_config.speculative_config is not None:
            raise refusal("speculative decoding")
        _compat.add_splitting_op(vllm_config.compilation_config)
        from talan_serve.plugins.vllm.worker import WORKER_EXTENSION

        parallel = vllm_config.parallel_config
        many = checkpoint_config_of(vllm_config.model_config.hf_config) is None
        if not parallel.worker_extension_cls:
            parallel.worker_extension_cls = WORKER_EXTENSION
        elif many and parallel.worker_extension_cls != WORKER_EXTENSION:
            raise ValueError("talan-serve: a base for TALAN adapters loads them through its "
                             f"worker extension; worker_extension_cls is "
                             f"{parallel.worker_extension_cls!r}")
