"""TEST STAND-IN for the ``sgl_kernel`` (sglang-kernel) package on a CPU without
AMX/AVX-512 and without a CPU build of the kernel library. NOT FOR SERVING.

PyPI ships only the CUDA build of sglang-kernel; its import fails on a machine without
libcuda. SGLang's CPU engine (SGLANG_USE_CPU_ENGINE=1) imports a few ``*_cpu`` ops at
module import time. This package, first on PYTHONPATH in test runs only, provides:

* plain-torch implementations of the ops the tiny-model tests actually execute;
* import-only names that raise NotImplementedError when called.

Every name here is listed explicitly; anything else fails at import (AttributeError /
ImportError), so a new dependency is seen, not silently stubbed.
"""

from __future__ import annotations

import torch

__version__ = "0.0.0+test-standin"
IS_TEST_STANDIN = True


def _not_implemented(name: str):
    def fn(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name}: not provided by the test stand-in"
        )

    fn.__name__ = name
    return fn


# --- plain-torch implementations (executed by the tests) --------------------------------


def assign_req_to_token_pool_cpu(
    req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, *rest, **kw
):
    """req_to_token[req, start:end] = out_cache_loc[packed], per request (plain torch)."""
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    offset = 0
    for row, start, end in zip(rows, starts, ends, strict=True):
        n = end - start
        req_to_token[row, start:end] = out_cache_loc[offset : offset + n].to(req_to_token.dtype)
        offset += n


# --- import-only names (raise when called) ----------------------------------------------

_IMPORT_ONLY = [
    "copy_all_layer_kv_cache_cpu",      # kernels/ops/kvcache/cache_move.py (KV copy)
    "rotate_input_ids_cpu",             # kernels/ops/speculative/multi_layer_eagle.py
    "fill_accept_out_cache_loc_cpu",    # kernels/ops/speculative/eagle.py
    "fill_bonus_tokens_cpu",            # kernels/ops/speculative/eagle.py
    "verify_tree_greedy_cpu",           # kernels/ops/speculative/spec_tree.py
    "build_tree_kernel_efficient_cpu",  # kernels/ops/speculative/spec_tree.py
    "assign_draft_cache_locs_contiguous_cpu",  # kernels/ops/speculative/cache_locs.py
    "assign_extend_cache_locs_cpu",     # kernels/ops/speculative/cache_locs.py
]
for _name in _IMPORT_ONLY:
    globals()[_name] = _not_implemented(_name)

# torch.ops.sgl_kernel.<name> looked up (not called) at import time.
_TORCH_OPS_IMPORT_ONLY = [
    "fused_gdn_gating_cpu",                          # layers/attention/linear/gdn_backend.py
    "fused_sigmoid_gating_delta_rule_update_cpu",    # .../linear/kernels/gdn_triton.py
]


def _register_torch_ops() -> None:
    lib = torch.library.Library("sgl_kernel", "FRAGMENT")
    for name in _TORCH_OPS_IMPORT_ONLY:
        try:
            lib.define(f"{name}(Tensor x) -> Tensor")
        except RuntimeError:
            continue  # already defined in this process
        lib.impl(name, _not_implemented(name), "CompositeExplicitAutograd")
    globals()["_LIB"] = lib


_register_torch_ops()

from sgl_kernel import mamba  # noqa: E402,F401
