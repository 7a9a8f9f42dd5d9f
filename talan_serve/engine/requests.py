"""What one request runs inside an engine, and the cache namespace that puts it in.

A request's engine arguments carry the switch (``talan_serve.switch``); each engine keeps
them under its own field of its sampling parameters (vLLM: ``extra_args``, SGLang:
``custom_params``). Layers after a connection point see another residual stream when a
request runs TALAN off or another adapter, so its KV cache differs for the same tokens:
each such request gets its own prefix-cache (radix-cache) namespace, derived here once for
every engine. Requests that run a one-checkpoint server's TALAN, and every model without
TALAN, keep the engine's own keys. Adapter ids are never reused, so the cached blocks of
an unloaded adapter are never hit again.
"""

from __future__ import annotations

from typing import Any

from talan_serve.switch import DEFAULT_ADAPTER, NO_ADAPTER, adapter_in

OFF_NAMESPACE = "off"


def request_adapter(params: Any, field: str) -> int:
    """The adapter id a request runs, from its engine's sampling ``params`` (the switch under
    ``field``); ``NO_ADAPTER`` when TALAN is off, ``SwitchError`` if malformed."""
    return adapter_in(getattr(params, field, None))


def cache_namespace(adapter: int) -> str | None:
    """The cache namespace of requests running ``adapter``: None (the engine's own keys) for
    a one-checkpoint server's adapter, else one per adapter id and one for TALAN off."""
    if adapter == DEFAULT_ADAPTER:
        return None
    return OFF_NAMESPACE if adapter == NO_ADAPTER else f"adapter={adapter}"
