"""patches/deepspeed_scalar_broadcast.py: applies to the pinned DeepSpeed, fails loudly if
upstream moves, and is still needed (upstream still reinterprets 0-dim parameters)."""

from __future__ import annotations

import inspect

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed")


def test_the_patch_wraps_the_pinned_deepspeed_broadcast():
    from deepspeed.runtime.engine import DeepSpeedEngine

    from patches import apply_deepspeed, deepspeed_scalar_broadcast

    assert deepspeed.__version__ in deepspeed_scalar_broadcast.TARGET_VERSIONS
    assert apply_deepspeed() == ["deepspeed_scalar_broadcast"]
    original = DeepSpeedEngine._broadcast_model.__wrapped__
    # Upstream still views every parameter as bytes, which no 0-dim tensor allows: once
    # this fails, DeepSpeed broadcasts scalars itself and the patch can go.
    assert "p.data.view(torch.uint8)" in inspect.getsource(original)
    with pytest.raises(RuntimeError, match="cannot be 0"):
        torch.zeros(()).view(torch.uint8)


def test_the_wrapper_restores_every_shape_and_shares_the_storage():
    from patches.deepspeed_scalar_broadcast import with_scalars_as_vectors

    module = torch.nn.Module()
    module.scalar = torch.nn.Parameter(torch.tensor(1.5))
    module.vector = torch.nn.Parameter(torch.ones(3))
    seen = {}

    def received(engine):  # what DeepSpeed's broadcast does to each parameter, minus the wire
        for name, param in engine.module.named_parameters():
            seen[name] = tuple(param.shape)
            param.data.view(torch.uint8).fill_(0)

    with_scalars_as_vectors(received)(type("Engine", (), {"module": module})())
    assert seen == {"scalar": (1,), "vector": (3,)}
    assert module.scalar.shape == () and float(module.scalar) == 0.0
    assert module.vector.shape == (3,) and float(module.vector.sum()) == 0.0
