"""TALAN inside serving engines: one plugin package per engine, holding only its glue.

A plugin runs inside its engine's processes. It hands the engine's batch metadata to the
engine-neutral side path (``talan_serve.engine``: the step, the layer swap, the model
mixin, run-time loading, what a request runs), keeps each request's state
(``AdapterSetSpec.state_shape``, ``block.STATE_DTYPE``) in the engine's state cache, and
loads the folders that ``talan_serve.prepared`` writes. What every plugin must refuse is
written here, once.
"""

from __future__ import annotations

# Engine features that would break the state contract, and why (docs/design.md).
UNSUPPORTED = {
    "speculative decoding": "draft tokens would advance the running summary before they "
                            "are accepted",
    "sliding-window attention": "TALAN registers its state as one more layer type beside "
                                "the host's, which must all be full attention",
}


def refusal(feature: str) -> ValueError:
    """The error a plugin raises for a feature in ``UNSUPPORTED``."""
    return ValueError(f"talan-serve: {feature} is not supported for TALAN models: "
                      f"{UNSUPPORTED[feature]}")
