"""DeepSpeed's start-up broadcast of the model must take 0-dim parameters.

``DeepSpeedEngine._broadcast_model`` sends every parameter as
``p.data.view(torch.uint8)``, which torch refuses for a 0-dim tensor ("self.dim() cannot
be 0 to view Float as Byte"). TALAN's learned-gate bias (and the ``direct`` writeback's
alpha) are 0-dim, so every TALAN run under DeepSpeed stops there. This patch wraps the
method: for the duration of the broadcast each 0-dim parameter is a one-element view of
the same storage, so DeepSpeed broadcasts the same bytes into it; the shapes are put
back before anything else runs.

Targets DeepSpeed 0.19.8; ``apply()`` raises if the method moved, and
``tests/training/test_deepspeed_patch.py`` fails once upstream broadcasts 0-dim parameters
itself (then this patch can go).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

TARGET_VERSIONS = ("0.19.8",)
_APPLIED = False


def apply() -> bool:
    global _APPLIED
    if _APPLIED:
        return True
    import deepspeed
    from deepspeed.runtime.engine import DeepSpeedEngine

    if deepspeed.__version__ not in TARGET_VERSIONS:
        return False
    original = getattr(DeepSpeedEngine, "_broadcast_model", None)
    if original is None:
        raise RuntimeError(
            "patches/deepspeed_scalar_broadcast.py: DeepSpeedEngine has no _broadcast_model; "
            "check how this DeepSpeed version broadcasts 0-dim parameters and update it.")

    DeepSpeedEngine._broadcast_model = with_scalars_as_vectors(original)
    _APPLIED = True
    return True


def with_scalars_as_vectors(broadcast: Callable[[Any], None]) -> Callable[[Any], None]:
    """``broadcast(engine)`` with every 0-dim parameter of ``engine.module`` seen as a
    one-element view of its own storage."""

    def broadcast_with_scalars(engine: Any) -> None:
        scalars = [p for p in engine.module.parameters() if p.dim() == 0]
        for param in scalars:
            param.data = param.data.reshape(1)
        try:
            broadcast(engine)
        finally:
            for param in scalars:
                param.data = param.data.reshape(())

    broadcast_with_scalars.__wrapped__ = broadcast
    return broadcast_with_scalars
