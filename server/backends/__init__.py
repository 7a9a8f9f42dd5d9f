"""The front end's engines: each fills in the backend template (``template.py``) with its
engine's calls and policy; ``base.py`` is the interface the rest of the server sees. The
code that runs inside each engine is ``talan_serve.plugins.<engine>``.
"""

from __future__ import annotations

import pkgutil
from typing import Any

from server.backends.template import BackendConfig, EngineBackend

# --engine NAME -> its backend class; importing one imports no engine (each does, lazily).
BACKENDS = {
    "vllm": "server.backends.vllm:VllmBackend",
    "sglang": "server.backends.sglang:SglangBackend",
}


def backend_class(name: str) -> type[EngineBackend]:
    if name not in BACKENDS:
        raise ValueError(f"unknown engine {name!r}; choose one of: {', '.join(BACKENDS)}")
    return pkgutil.resolve_name(BACKENDS[name])


def make_backend(name: str, **kwargs: Any) -> EngineBackend:
    """Build and start the backend called ``name``."""
    return backend_class(name)(BackendConfig(**kwargs))
