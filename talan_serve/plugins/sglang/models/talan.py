"""TALAN twins of SGLang's own causal-LM classes: SGLang's glue for ``talan_serve.engine.model``.

``TalanQwen3ForCausalLM`` *is* SGLang's ``Qwen3ForCausalLM`` (same ``__init__``, weights,
LoRA targets, pipeline split) plus the engine-neutral mixin, and here what is SGLang's:

* the refusals checked again in each scheduler (``guards.check_runtime``) and the loaded
  config given the hybrid-pool interface (``config.upgraded``);
* the state layer (``self.talan``, ``layer.SglangStateLayer``), whose state lives in
  SGLang's state pool under one decoder layer's id;
* the swapped decoder layer's forward. ``embedding``: TALAN on the stream entering decoder
  layer 0. ``layer_N``: after decoder layer N, SGLang's residual stream ``fold`` gives the
  full stream ``X = hidden + residual`` (tensor-parallel reduction included), TALAN gives
  ``X + delta``, and ``set_written`` hands it on as the next layer's residual.
"""

from __future__ import annotations

from talan_serve.engine.model import TalanModelMixin, class_builder
from talan_serve.hosts import TALAN_ARCHITECTURES
from talan_serve.plugins.sglang import _compat
from talan_serve.plugins.sglang.config import state_layer_id, upgraded
from talan_serve.prepared import adapter_set_spec_of


def _forward_for(layer_cls: type):
    """The swapped decoder layer's forward: the side path before it (``embedding``) and/or
    after it (``layer_N``), on the full residual stream."""
    fold, set_written = _compat.resolve("residual_fold"), _compat.resolve("residual_set_written")

    def forward(self, positions, hidden_states, forward_batch, *args, **kwargs):
        if self._talan_before is not None:
            stream = forward_batch.residual_stream
            if stream is not None and stream.residual is None and stream.pending is None:
                # A fresh layer stack: hidden_states is the whole stream.
                hidden_states = self._talan_side_path(hidden_states, forward_batch,
                                                      self._talan_before)
            else:  # a stream handed over (pipeline stage): fold it first
                hidden_states = set_written(
                    self._talan_side_path(fold(hidden_states, forward_batch), forward_batch,
                                          self._talan_before),
                    forward_batch)
        out = layer_cls.forward(self, positions, hidden_states, forward_batch, *args, **kwargs)
        if self._talan_after is None:
            return out
        stream = fold(out, forward_batch)
        return set_written(self._talan_side_path(stream, forward_batch, self._talan_after),
                           forward_batch)

    return forward


class SglangTalanModel(TalanModelMixin):
    """Mixed in front of an SGLang causal-LM class; see the module docstring."""

    def __init__(self, config, *args, **kwargs):
        from talan_serve.plugins.sglang.guards import check_runtime
        from talan_serve.plugins.sglang.layer import SglangStateLayer

        check_runtime()
        upgraded(config)
        super().__init__(config, *args, **kwargs)
        spec = adapter_set_spec_of(config)
        self._attach_talan(
            config, [getattr(config, "_name_or_path", None), _served_model_path()],
            lambda side_path: SglangStateLayer(side_path, layer_id=state_layer_id(spec)),
            _forward_for)


def _served_model_path() -> str | None:
    """The folder SGLang serves, when it has published its runtime context."""
    try:
        return _compat.resolve("runtime_model")().model_path
    except Exception:  # noqa: BLE001 - no published context (a model built by hand)
        return None


_build = class_builder(globals(), SglangTalanModel, _compat.HOST_MODULES)


def __getattr__(name: str) -> type:
    return _build(name)


# SGLang's external model package reads EntryClass.
EntryClass = [_build(arch) for arch in TALAN_ARCHITECTURES]
