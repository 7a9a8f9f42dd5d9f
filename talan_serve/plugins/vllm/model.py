"""TALAN twins of vLLM's own model classes: vLLM's glue for ``talan_serve.engine.model``.

``TalanQwen3ForCausalLM`` *is* vLLM's ``Qwen3ForCausalLM`` (same ``__init__``, weights,
LoRA, pipeline split, torch.compile) plus the engine-neutral mixin, and here what is vLLM's:

* the state layer (``self.talan``, ``layer.VllmStateLayer``) whose state vLLM caches per
  request, named after the last decoder layer, and N - 1 weightless placeholders that keep
  vLLM's KV-cache groups at two (``layer.TalanStatePlaceholder``);
* the swapped decoder layer's forward: vLLM's decoder layers return ``(hidden,
  residual)`` with the stream ``X = hidden + residual``; after the layer the side path
  returns ``(delta, X)``, which the next layer's fused add-norm turns into ``X + delta``
  exactly (one rounding, like the reference block's ``hidden + delta``);
* the hybrid-model interface (``IsHybrid``, ``HasInnerState``, mamba prefix caching) and
  a config hook that makes vLLM treat the model as hybrid.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from talan_serve.block import STATE_DTYPE
from talan_serve.engine.model import LAYER_NAME, TalanModelMixin, class_builder
from talan_serve.plugins import refusal
from talan_serve.plugins.vllm import _compat
from talan_serve.plugins.vllm._compat import (
    HasInnerState,
    IsHybrid,
    SupportsMambaPrefixCaching,
    VerifyAndUpdateConfig,
    get_temporal_copy_spec,
)
from talan_serve.prepared import adapter_set_spec_of, checkpoint_config_of

LAYER_TYPE = "talan"  # TALAN's entry in the host config's layer_types
TRACKER_PROCESSOR = "talan_serve.plugins.vllm.rows:RowAdapterTracker"


def _forward_for(layer_cls: type):
    """The swapped decoder layer's forward: the side path before it (``embedding``, on
    decoder layer 0) and/or after it (``layer_N``), on the full residual stream."""
    from talan_serve.plugins.vllm.layer import side_path_delta

    def forward(self, positions, hidden_states, residual, *args, **kwargs):
        if self._talan_before is not None:
            if residual is not None:  # only reachable through pipeline hand-over tensors
                hidden_states, residual = hidden_states + residual, None
            hidden_states = hidden_states + side_path_delta(
                self._talan_side_path, self._talan_before, hidden_states)
        hidden, residual = layer_cls.forward(
            self, positions, hidden_states, residual, *args, **kwargs
        )
        if self._talan_after is None:
            return hidden, residual
        stream = hidden + residual
        # Next: residual = delta + stream, i.e. X + delta with one rounding.
        return side_path_delta(self._talan_side_path, self._talan_after, stream), stream

    return forward


class VllmTalanModel(TalanModelMixin):
    """Mixed in front of a vLLM causal-LM class; see the module docstring.

    The hybrid-model interfaces go after the host class in the bases (they are
    ``Protocol`` classes, whose ``__init__`` would otherwise shadow the host's).
    """

    is_hybrid = True
    has_inner_state = True
    supports_mamba_prefix_caching = True

    def __init__(self, *, vllm_config: Any, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        from talan_serve.plugins.vllm.layer import TalanStatePlaceholder, VllmStateLayer

        hf_config = vllm_config.model_config.hf_config
        # vLLM orders state/KV caches by the one integer in a layer name; TALAN's state
        # takes the index after the last decoder layer (as vLLM's MTP layers do). The op
        # finds the layer by that name in vLLM's forward context.
        base = f"{prefix}.{LAYER_NAME}" if prefix else LAYER_NAME
        name = f"{base}.{hf_config.num_hidden_layers}"
        layer = self._attach_talan(
            hf_config, [vllm_config.model_config.model],
            lambda side_path: VllmStateLayer(
                side_path, prefix=name, max_num_seqs=vllm_config.scheduler_config.max_num_seqs),
            _forward_for, handle=lambda layer: layer.prefix)
        if layer is None:
            return
        # One KV-cache group for the attention layers, one for the state (see
        # TalanStatePlaceholder): N - 1 placeholders named after the decoder layers.
        num_layers = self.model.end_layer - self.model.start_layer
        shape = layer.side_path.adapters.state_shape
        self.talan_placeholders = [
            TalanStatePlaceholder(shape, f"{base}_placeholder.{hf_config.num_hidden_layers + i}")
            for i in range(1, num_layers)
        ]

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


# TalanQwen3ForCausalLM etc. are built on first access (vLLM imports them lazily).
__getattr__ = class_builder(globals(), VllmTalanModel, _compat.HOST_MODULES,
                            (HasInnerState, IsHybrid, SupportsMambaPrefixCaching))


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
        # The switch reaches the forward through this V1 logits processor.
        processors = list(model_config.logits_processors or [])
        if TRACKER_PROCESSOR not in processors:
            model_config.logits_processors = [*processors, TRACKER_PROCESSOR]
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
