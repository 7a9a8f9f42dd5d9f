"""TALAN inside SGLang: a plugin (entry point ``sglang.srt.plugins: talan``).

``register()`` runs in every SGLang process (parent, scheduler, detokenizer). It

* makes SGLang resolve a ``Talan<Host>`` architecture for each host of
  ``talan_serve.hosts``, all made by one mixin over SGLang's own class (``models/``, on
  ``talan_serve.engine``), through SGLang's external model package;
* declares TALAN's per-request state to SGLang's linear-attention model registry
  (``config.py``), so that SGLang keeps one state per request in its hybrid state pool:
  zeroed for a new request, carried across prefill chunks, copied from the cached prefix
  on a radix-cache hit (``state_backend.py``, ``layer.py``);
* registers, through SGLang's ``HookRegistry``, the reading of each request's switch
  (``rows.py``), the refusals of what would break the state (``guards.py``) and the RPC
  methods that load and unload adapters at run time (``rpc.py``).

Serve a folder written by ``talan_serve.prepared.prepare_model_dir``; switch TALAN off for
one request with ``sampling_params={"custom_params": talan_serve.switch.switch_args(False)}``.
"""

from __future__ import annotations

import os
import sys

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from talan_serve.plugins.sglang import _compat, config, guards, rows, rpc

    _compat.check_version()
    config.register_state_spec()
    register_models()
    rows.register_hooks()
    guards.register_hooks()
    rpc.register_hooks()


def register_models() -> None:
    """Make SGLang resolve the ``Talan<Host>`` architectures.

    Through SGLang's external model package (which also spares importing every in-tree
    model) when the registry is not imported yet; else straight into its registry.
    """
    from talan_serve.plugins.sglang import _compat

    if os.environ.get(_compat.EXTERNAL_MODEL_ENV) == _compat.EXTERNAL_MODEL_PACKAGE:
        return
    if "sglang.srt.models.registry" not in sys.modules and not os.environ.get(
            _compat.EXTERNAL_MODEL_ENV):
        # Child processes inherit it.
        os.environ[_compat.EXTERNAL_MODEL_ENV] = _compat.EXTERNAL_MODEL_PACKAGE
        return
    from talan_serve.hosts import TALAN_ARCHITECTURES
    from talan_serve.plugins.sglang.models import talan

    registry = _compat.resolve("model_registry")
    for arch in TALAN_ARCHITECTURES:
        registry.models.setdefault(arch, getattr(talan, arch))
