"""TALAN's per-request state declared to SGLang as a "linear attention" side state.

The model folder is the one ``talan_serve.prepared`` writes: the host's config.json with
``architectures: ["Talan<Host>"]`` and a ``talan`` section (one checkpoint) or a
``talan_adapters`` one (a base for many adapters), which transformers loads as the
host's config class (``Qwen3Config``). SGLang's linear-attention registry matches a config
by class and predicate; the matched config must then expose the hybrid-pool interface
(``full_attention_layer_ids``, ``mamba2_cache_params``, ...), as LFM2's does. The
predicate upgrades the loaded config in place to a subclass of its own class that adds
exactly those properties (no field changes, nothing serialised).

State per pool entry, in the pool's ``MambaPool``: ``conv[0]`` is the running summary
(``AdapterSetSpec.state_shape``, ``block.STATE_DTYPE``); ``conv[1]`` is a (1, 1) entry the
pool's layout needs and nothing reads; the temporal (SSM) state is empty.
"""

from __future__ import annotations

from typing import Any

from talan_serve.adapter_spec import AdapterSetSpec
from talan_serve.block import STATE_DTYPE
from talan_serve.config import connection_layer
from talan_serve.hosts import TALAN_ARCHITECTURES
from talan_serve.plugins.sglang import _compat
from talan_serve.prepared import ADAPTERS_KEY, CONFIG_KEY, adapter_set_spec_of


def state_layer_id(spec: AdapterSetSpec) -> int:
    """The decoder layer the state is registered under: N for ``layer_N``, 0 for the
    embedding (the side path then runs at the entry of layer 0). One state per request,
    whichever connection point its adapter uses: it goes under the first point."""
    index = connection_layer(spec.connection_points[0])
    return 0 if index is None else index


class TalanHybridConfigMixin:
    """The hybrid-pool interface for a TALAN host config (see the module docstring)."""

    @property
    def talan_adapter_spec(self) -> AdapterSetSpec:
        return adapter_set_spec_of(self)

    @property
    def full_attention_layer_ids(self) -> list[int]:
        return list(range(self.num_hidden_layers))

    @property
    def linear_layer_ids(self) -> list[int]:
        return [state_layer_id(self.talan_adapter_spec)]

    @property
    def mamba_chunk_size(self) -> int:
        return 1

    @property
    def mamba2_cache_params(self):
        cache_params = _compat.resolve("mamba_cache_params")
        state_shape = _compat.resolve("mamba_state_shape")
        state_dtype = _compat.resolve("mamba_state_dtype")
        shape = self.talan_adapter_spec.state_shape
        width = shape[1]
        return cache_params(
            shape=state_shape(
                conv=[shape, (1, 1)], temporal=(1, 1, 0), disable_conv_window_dedup=True,
                intermediate_size=width, conv_dim=width, ssm_state_size=0, num_heads=1,
                head_dim=1, state_size=0, conv_kernel=2),
            layers=self.linear_layer_ids,
            # The pool would otherwise default to SGLANG_MAMBA_CONV_DTYPE (bf16).
            dtype=state_dtype(conv=STATE_DTYPE, temporal=STATE_DTYPE),
        )


_UPGRADED: dict[type, type] = {}


def _upgraded_class(cls: type) -> type:
    if issubclass(cls, TalanHybridConfigMixin):
        return cls
    if cls not in _UPGRADED:
        name = f"Talan{cls.__name__}"
        _UPGRADED[cls] = type(name, (TalanHybridConfigMixin, cls), {"__module__": __name__})
        globals()[name] = _UPGRADED[cls]  # importable by name (pickle)
    return _UPGRADED[cls]


def is_talan_config(config: Any) -> bool:
    """The linear-attention registry's predicate; upgrades a TALAN config in place."""
    archs = getattr(config, "architectures", None) or []
    if not archs or archs[0] not in TALAN_ARCHITECTURES:
        return False
    if getattr(config, CONFIG_KEY, None) is None and getattr(config, ADAPTERS_KEY, None) is None:
        return False
    config.__class__ = _upgraded_class(type(config))
    return True


def upgraded(config: Any) -> Any:
    if not is_talan_config(config):
        raise ValueError("talan-serve: not a TALAN model config: "
                         f"{getattr(config, 'architectures', None)}")
    return config


def register_state_spec() -> None:
    from transformers import PretrainedConfig

    specs = _compat.resolve("linear_attn_specs")
    if any(s.backend_class_name == _compat.STATE_BACKEND_CLASS for s in specs):
        return
    _compat.resolve("linear_attn_registry")(_compat.resolve("linear_attn_spec")(
        config_class=PretrainedConfig,
        backend_class_name=_compat.STATE_BACKEND_CLASS,
        hybrid_backend_class_name=_compat.HYBRID_BACKEND_CLASS,
        arch_names=list(TALAN_ARCHITECTURES),
        uses_mamba_radix_cache=True,
        support_mamba_cache=True,
        support_mamba_cache_extra_buffer=False,
        config_predicate=is_talan_config,
    ))


def __getattr__(name: str):
    # Unpickling an upgraded config in a process where it was not built yet.
    if name.startswith("Talan") and name.endswith("Config"):
        import transformers

        base = getattr(transformers, name[len("Talan"):], None)
        if base is not None:
            return _upgraded_class(base)
    raise AttributeError(name)
