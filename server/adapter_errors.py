"""What can go wrong with an adapter on a server of many, as the client is answered.

Each error carries its HTTP status; ``server.runner`` and ``server.adapter_api`` turn them
into OpenAI-style bodies. None of them is ever a 5xx: a bad adapter is the request's
problem, and the other adapters keep serving.
"""

from __future__ import annotations


class AdapterError(ValueError):
    """A load or unload that cannot be done (answered as HTTP 400)."""

    status = 400
    code: str | None = None


class ModelNotFoundError(LookupError):
    """A ``model`` that is not, or no longer, served (answered as HTTP 404)."""


class AdapterRefused(AdapterError):
    """An adapter that this server will not load, with the reason: a name that is not a
    plain folder name, a path out of its directory, a checkpoint that fails validation
    or does not fit what the server was started for. ``reason`` is the metric's label."""

    def __init__(self, message: str, reason: str, status: int = 400,
                 code: str = "invalid_adapter"):
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.code = code


class AdapterQueueFull(RuntimeError):
    """Too many requests already wait for their adapter to be loaded (HTTP 429)."""
