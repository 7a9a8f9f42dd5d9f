"""Every SGLang-internal name this plugin touches, in one place (SGLang 0.5.23).

The plugin's other modules reach SGLang through the names listed here;
``tests/sglang/test_plugin.py`` resolves each of them, so an SGLang upgrade that moves
one fails there first, not deep inside a forward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from talan_serve.hosts import host_modules

logger = logging.getLogger(__name__)

TARGET_SGLANG_VERSIONS = ("0.5.23",)

# SGLang's module of each host architecture (talan_serve.hosts).
HOST_MODULES = host_modules("sglang.srt.models")

# Where a request's per-request arguments (the switch) sit in SGLang's sampling params.
ARGS_FIELD = "custom_params"

# Dotted names used by the plugin (resolved one by one in the guard test).
_LINEAR = "sglang.srt.configs.linear_attn_model_registry"
_ATTENTION = "sglang.srt.layers.attention"
SYMBOLS = {
    "linear_attn_registry": f"{_LINEAR}.register_linear_attn_model",
    "linear_attn_specs": f"{_LINEAR}._LINEAR_ATTN_MODEL_REGISTRY",
    "linear_attn_spec": f"{_LINEAR}.LinearAttnModelSpec",
    "mamba_cache_params": "sglang.srt.configs.mamba_utils.Mamba2CacheParams",
    "mamba_state_shape": "sglang.srt.configs.mamba_utils.Mamba2StateShape",
    "mamba_state_dtype": "sglang.srt.configs.mamba_utils.Mamba2StateDType",
    "short_conv_backend": f"{_ATTENTION}.linear.short_conv_backend.ShortConvAttnBackend",
    "short_conv_hybrid_backend":
        f"{_ATTENTION}.hybrid_linear_attn_backend.ShortConvHybridAttnBackend",
    "get_attn_backend": "sglang.srt.model_executor.forward_context.get_attn_backend",
    "residual_fold": "sglang.srt.layers.layer_boundary.residual.batch.fold",
    "residual_set_written": "sglang.srt.layers.layer_boundary.residual.batch.set_written",
    "model_registry": "sglang.srt.models.registry.ModelRegistry",
    "hook_registry": "sglang.srt.plugins.hook_registry.HookRegistry",
    "hook_type": "sglang.srt.plugins.hook_registry.HookType",
    "runtime_flags": "sglang.srt.runtime_context.get_flags",
    "runtime_model": "sglang.srt.runtime_context.get_model",
    # hook targets (rows.py, guards.py, rpc.py)
    "sampling_verify": "sglang.srt.sampling.sampling_params.SamplingParams.verify",
    "req_init": "sglang.srt.managers.schedule_batch.Req.__init__",
    "forward_batch_init_new": "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",
    "check_server_args": "sglang.srt.server_args.ServerArgs.check_server_args",
    "scheduler_rpc": "sglang.srt.managers.scheduler.Scheduler.handle_rpc_request",
}
HOOK_TARGETS = ("sampling_verify", "req_init", "forward_batch_init_new", "check_server_args",
                "scheduler_rpc")

STATE_BACKEND_CLASS = "talan_serve.plugins.sglang.state_backend.SglangStateBackend"
HYBRID_BACKEND_CLASS = SYMBOLS["short_conv_hybrid_backend"]
EXTERNAL_MODEL_PACKAGE = "talan_serve.plugins.sglang.models"
EXTERNAL_MODEL_ENV = "SGLANG_EXTERNAL_MODEL_PACKAGE"


def resolve(key: str):
    """The object ``SYMBOLS[key]`` names (raises if SGLang moved it)."""
    import pkgutil

    owner, attr = SYMBOLS[key].rsplit(".", 1)
    return getattr(pkgutil.resolve_name(owner), attr)


def sglang_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sglang")
    except PackageNotFoundError:
        return "unknown"


def check_version() -> None:
    found = sglang_version()
    if found not in TARGET_SGLANG_VERSIONS:
        logger.warning("talan-serve's SGLang plugin was written for SGLang %s; found %s",
                       ", ".join(TARGET_SGLANG_VERSIONS), found)


def register_hook(target: str, hook: Callable, kind: str) -> None:
    """Register ``hook`` on the ``SYMBOLS[target]`` method with SGLang's ``HookRegistry``;
    ``kind``: ``AFTER`` or ``AROUND`` (SGLang's ``HookType``)."""
    resolve("hook_registry").register(SYMBOLS[target], hook, getattr(resolve("hook_type"), kind))
