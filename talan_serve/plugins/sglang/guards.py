"""What TALAN models refuse in SGLang, and where.

1. In the parent, before any subprocess starts: after ``ServerArgs.check_server_args``
   (called by ``Engine`` and the HTTP launcher), on the operator's arguments, when the
   model folder names a ``Talan<Host>`` architecture.
2. In each scheduler process, in the model's ``__init__`` (``check_runtime``), on the
   values in effect, as a second line.

Refused: speculative decoding (``talan_serve.plugins.UNSUPPORTED``) and what would move,
split or quantize the state where the plugin does not follow it: DP attention, two- and
single-batch overlap, PD disaggregation, HiCache, PD multiplexing (split prefill), dLLM
decoding, int8 state checkpoints, ReplaySSM, and the ``extra_buffer`` radix strategy
(which needs the model to write tracked states). SGLang itself turns overlap scheduling
off for the ``no_buffer`` strategy the state uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from talan_serve.hosts import TALAN_ARCHITECTURES
from talan_serve.plugins import refusal
from talan_serve.plugins.sglang import _compat

# server argument: (its harmless value, what it turns on)
REFUSED = {
    "speculative_algorithm": (None, "speculative decoding"),
    "enable_dp_attention": (False, "DP attention"),
    "enable_two_batch_overlap": (False, "two-batch overlap"),
    "enable_single_batch_overlap": (False, "single-batch overlap"),
    "enable_hierarchical_cache": (False, "HiCache"),
    "enable_pdmux": (False, "PD multiplexing (split prefill)"),
    "dllm_algorithm": (None, "dLLM decoding"),
    "enable_int8_mamba_checkpoint": (False, "int8 state checkpoints"),
    "enable_linear_replayssm": (False, "ReplaySSM"),
}


def problems(view: Any) -> list[str]:
    """What in ``view`` (server arguments, or the flags in effect) TALAN cannot serve."""
    found = []
    for field, (harmless, feature) in REFUSED.items():
        value = getattr(view, field, harmless)
        if value not in (harmless, None, False, "", "null", "none", "NONE"):
            found.append(f"{feature} ({field}={value!r})")
    disaggregation = getattr(view, "disaggregation_mode", "null")
    if disaggregation not in (None, "null"):
        found.append(f"PD disaggregation (disaggregation_mode={disaggregation!r})")
    if getattr(view, "mamba_radix_cache_strategy", "auto") == "extra_buffer" or \
            getattr(view, "enable_mamba_extra_buffer", False) is True:
        found.append("the extra_buffer radix-cache strategy (use no_buffer or auto)")
    return found


def _raise_for(found: list[str]) -> None:
    if not found:
        return
    if found[0].startswith("speculative decoding"):
        raise refusal("speculative decoding")
    raise ValueError("talan-serve: TALAN models in SGLang do not support "
                     + "; ".join(found) + " (the per-request state would not follow)")


def _is_talan_folder(model_path: str) -> bool:
    try:
        record = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False
    archs = record.get("architectures") or []
    return bool(archs) and archs[0] in TALAN_ARCHITECTURES


def _after_check_server_args(result, server_args, *args, **kwargs):
    if _is_talan_folder(getattr(server_args, "model_path", "")):
        _raise_for(problems(server_args))
    return None


def check_runtime() -> None:
    """From the TALAN model's ``__init__``, with the values in effect."""
    try:
        view = _compat.resolve("runtime_flags")()
    except Exception:  # noqa: BLE001 - no published context (a model built by hand)
        return
    _raise_for(problems(view))


def register_hooks() -> None:
    _compat.register_hook("check_server_args", _after_check_server_args, "AFTER")
