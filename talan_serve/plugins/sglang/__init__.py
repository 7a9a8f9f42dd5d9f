"""TALAN inside SGLang: a plugin (entry point ``sglang.srt.plugins: talan``).

``register()`` runs in every SGLang process (parent, scheduler, detokenizer). It

* makes SGLang resolve a ``Talan<Host>`` architecture for each supported host (Qwen3,
  Qwen3-MoE, Qwen2, Llama), all made by one mixin over SGLang's own class (``models/``),
  through SGLang's external model package;
* declares TALAN's per-request state to SGLang's linear-attention model registry
  (``config.py``), so that SGLang keeps one state per request in its hybrid state pool:
  zeroed for a new request, carried across prefill chunks, copied from the cached prefix
  on a radix-cache hit (``state_backend.py``, ``layer.py``);
* registers, through SGLang's ``HookRegistry``, the per-request switch (``switch.py``),
  the refusals of what would break the state (``guards.py``) and the RPC methods that load
  and unload adapters at run time (``rpc.py``).

Serve a folder written by ``talan_serve.prepared.prepare_model_dir``; switch TALAN off for
one request with ``sampling_params={"custom_params": talan_serve.switch.switch_args(False)}``.
"""

from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from talan_serve.plugins.sglang import _compat, config, guards, rpc, switch

    _compat.check_version()
    config.register_state_spec()
    _compat.register_models()
    switch.register_hooks()
    guards.register_hooks()
    rpc.register_hooks()
