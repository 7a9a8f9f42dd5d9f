"""What every endpoint needs: the backend, limits, metrics and settings."""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass
class ServerState:
    backend: Backend
    settings: ServerSettings
    metrics: Metrics = field(default_factory=Metrics)
    admission: Admission = field(init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(self.settings.max_queued_requests)

    def accepts_model(self, name: str | None) -> bool:
        return name is None or name == self.backend.info.name or name in self.settings.served_names
