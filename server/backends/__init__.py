"""The front end's engine adapters: each maps the ``Backend`` protocol (``base.py``) onto one
engine's API. The code that runs inside the engine is ``talan_serve.plugins.<engine>``.
"""

from __future__ import annotations

from typing import Any

from server.backends.base import BackendConfig

BACKENDS = ("vllm", "sglang")


def make_backend(name: str, **kwargs: Any):
    """Build the backend called ``name`` (imported lazily: each pulls in a whole engine)."""
    if name == "vllm":
        from server.backends.vllm import VllmBackend

        return VllmBackend(BackendConfig(**kwargs))
    if name == "sglang":
        from server.backends.sglang import SglangBackend

        return SglangBackend(BackendConfig(**kwargs))
    raise ValueError(f"unknown engine {name!r}; choose one of: {', '.join(BACKENDS)}")
