"""TEST-ONLY SGLang plugin: what SGLang needs to run tiny models on this CPU, and probes.

Active only with this folder first on ``PYTHONPATH`` (``tests/sglang/conftest.py`` does
that for the SGLang test runs); runs in every SGLang process (entry point
``sglang.srt.plugins: talan_cpu_test_harness``). Not for serving.

* ``TALAN_TEST_PROBE=<file>``: one JSON line per TALAN layer call (scheduler process):
  request ids, forward mode, each row's running mass ``sum_t D`` before and after.
* ``TALAN_TEST_FAULT=drop_extend_state``: a negative control: every extend step starts
  from an empty state (ignores earlier chunks and radix-cache copies).
* ``TALAN_TEST_NO_PIN=1``: ``pin_memory`` becomes a no-op; SGLang's LoRA code pins host
  memory unconditionally, which fails without an NVIDIA driver.
"""

from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger(__name__)


def _metadata(layer, forward_batch):
    from talan_serve.plugins.sglang._compat import resolve

    return resolve("get_attn_backend")().conv_state_metadata(layer.layer_id, forward_batch)


def _install_probe(path: str) -> None:
    from talan_serve.plugins.sglang.layer import SglangStateLayer

    original = SglangStateLayer.run

    def run(self, stream, forward_batch, *args):
        mode = forward_batch.forward_mode
        if mode.is_idle() or stream.shape[0] == 0:
            return original(self, stream, forward_batch, *args)
        metadata = _metadata(self, forward_batch)
        indices = metadata.cache_indices.clamp(min=0)
        states = metadata.layer_cache.conv[0]
        d = self.side_path.adapters.spec.hidden_size
        before = states.index_select(0, indices)[..., d].sum(-1).tolist()
        out = original(self, stream, forward_batch, *args)
        after = states.index_select(0, indices)[..., d].sum(-1).tolist()
        adapters = metadata.entry_adapters.index_select(0, indices)
        record = {
            "mode": mode.name, "rids": list(forward_batch.rids or [])[: len(before)],
            "entries": indices.tolist(),
            "mass_before": before, "mass_after": after,
            "enabled": (adapters >= 0).tolist(),
            "adapters": adapters.tolist(),
            "extend_seq_lens": None if forward_batch.extend_seq_lens_cpu is None
            else list(forward_batch.extend_seq_lens_cpu),
            "extend_prefix_lens": None if forward_batch.extend_prefix_lens_cpu is None
            else list(forward_batch.extend_prefix_lens_cpu),
        }
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        return out

    SglangStateLayer.run = run


def _install_fault(kind: str) -> None:
    import torch

    from talan_serve import adapter_set

    if kind != "drop_extend_state":
        raise ValueError(f"unknown TALAN_TEST_FAULT {kind!r}")
    original = adapter_set.initial_states

    def initial_states(states, indices, resume):
        out = original(states, indices, resume)
        return torch.zeros_like(out) if resume is not None else out

    adapter_set.initial_states = initial_states
    logger.warning("TEST FAULT INJECTED: %s", kind)


_PIN_FACTORIES = ("tensor", "empty", "zeros", "ones", "full", "arange", "ones_like",
                  "zeros_like", "empty_like", "full_like", "as_tensor")


def _install_no_pin() -> None:
    import functools

    import torch

    if torch.cuda.is_available():
        return
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    for name in _PIN_FACTORIES:
        original = getattr(torch, name)

        @functools.wraps(original)
        def factory(*args, _original=original, **kwargs):
            kwargs.pop("pin_memory", None)
            return _original(*args, **kwargs)

        setattr(torch, name, factory)


def register() -> None:
    if os.environ.get("TALAN_TEST_PROBE"):
        _install_probe(os.environ["TALAN_TEST_PROBE"])
    if os.environ.get("TALAN_TEST_FAULT"):
        _install_fault(os.environ["TALAN_TEST_FAULT"])
    if os.environ.get("TALAN_TEST_NO_PIN") == "1":
        _install_no_pin()
