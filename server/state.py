"""What every endpoint needs: the backend, limits, metrics and settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from server.adapters import AdapterRegistry
from server.backends.base import Backend
from server.metrics import Metrics
from server.runner import Admission


@dataclass
class ServerSettings:
    api_key: str | None = None
    max_queued_requests: int = 256
    max_body_bytes: int = 8 * 1024 * 1024
    served_names: tuple[str, ...] = ()  # extra names accepted in the `model` field
    deterministic: bool = False
    # Where adapters may be loaded from at run time; empty: loading at run time is off.
    adapter_dirs: tuple[Path, ...] = ()


@dataclass
class ServerState:
    backend: Backend
    settings: ServerSettings
    metrics: Metrics = field(default_factory=Metrics)
    admission: Admission = field(init=False)
    engine_dead: bool = False

    def __post_init__(self) -> None:
        self.admission = Admission(self.settings.max_queued_requests)

    @property
    def tool_parser(self) -> str | None:
        """The engine's tool-call parser for ``tool_choice`` auto (``server.parsing``);
        None: tool calls are not read from the text."""
        return self.backend.info.tool_parser

    @property
    def reasoning_parser(self) -> str | None:
        """The engine's reasoning parser (``server.parsing``); None: no reasoning split."""
        return self.backend.info.reasoning_parser

    @property
    def registry(self) -> AdapterRegistry | None:
        """The named adapters, on a server of many (``server.adapters``); else None."""
        return self.backend.registry

    def adapter_name(self, name: str | None) -> str | None:
        """``name`` if it names an adapter, loaded or on demand from --adapter-dir (what
        the engine routes by), else None; ``AdapterRefused`` for a name that the
        directories refuse."""
        adapters = getattr(self.backend, "served_adapters", None)
        if adapters is None or name is None or name == self.backend.info.name \
                or name in self.settings.served_names:
            return None
        return name if adapters.offers(name) else None

    def accepts_model(self, name: str | None) -> bool:
        return (name is None or name == self.backend.info.name
                or name in self.settings.served_names or self.adapter_name(name) is not None)
