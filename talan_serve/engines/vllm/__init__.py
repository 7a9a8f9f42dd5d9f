"""TALAN inside vLLM: a general plugin (entry point ``vllm.general_plugins: talan``).

``register()`` runs in every vLLM process (front end, engine core, workers). It adds a
``Talan<Host>`` architecture for each supported host (Qwen3, Qwen3-MoE, Qwen2, Llama),
all made by one mixin over vLLM's own class (``model.py``), and the config hook that
makes vLLM treat them as hybrid models with a per-request state (``layer.py``).

Use ``prepare_model_dir`` to turn a checkpoint into a folder vLLM loads, and
``talan_extra_args(enabled=False)`` in ``SamplingParams.extra_args`` to switch TALAN off
for one request.
"""

from __future__ import annotations

from talan_serve.engines.vllm.switch import talan_extra_args

__all__ = ["register", "prepare_model_dir", "PreparedModel", "talan_extra_args"]


def register() -> None:
    from talan_serve.engines.vllm import _compat
    from talan_serve.engines.vllm.model import TalanHybridConfig

    _compat.apply_patches()
    registry = _compat.model_registry()
    hooks = _compat.models_config_map()
    supported = set(registry.get_supported_archs())
    for host in _compat.HOST_ARCHITECTURES:
        arch = _compat.talan_architecture(host)
        if arch not in supported:
            registry.register_model(arch, f"talan_serve.engines.vllm.model:{arch}")
        hooks[arch] = TalanHybridConfig


def __getattr__(name: str):
    # Lazy: importing the package (e.g. for talan_extra_args) must not import vLLM models.
    if name in ("prepare_model_dir", "PreparedModel"):
        from talan_serve.engines.vllm import prepare

        return getattr(prepare, name)
    raise AttributeError(name)
