"""Engine adapters: each turns the ``server.engine.Engine`` protocol into one engine's API."""

from __future__ import annotations

from typing import Any

BACKENDS = ("vllm",)


def make_engine(name: str, **kwargs: Any):
    """Build the backend called ``name`` (imported lazily: each pulls in a whole engine)."""
    if name == "vllm":
        from server.backends.vllm import VllmEngine, VllmEngineConfig

        return VllmEngine(VllmEngineConfig(**kwargs))
    raise ValueError(f"unknown engine {name!r}; choose one of: {', '.join(BACKENDS)}")
