"""TalanConfig: the six configuration axes of a TALAN block.

The field names follow the paper's Appendix C records (``n_themes``, ``network_type``, ...)
so that those records load verbatim; docs/design.md ("The block") defines what each one
means. The paper's four configurations are in ``talan_serve.presets``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIG_NAME = "talan_config.json"

CLUSTERING_METHODS = ("attention", "soft_mos")
NETWORK_TYPES = ("multihead_local", "cross_attn", "gated_cross_attn", "per_token_mix")
INTEGRATION_TYPES = ("direct", "learned_gate")
GATE_TYPES = ("vector", "scalar")
TRAINABLE_SCOPES = ("all", "gate_only", "frozen")

_LAYER_POINT = re.compile(r"^layer_(\d+)$")


class TalanConfigError(ValueError):
    """A TALAN config that cannot describe a block (bad field value or unknown field)."""


def connection_layer(point: str) -> int | None:
    """The decoder layer whose output a connection point rewrites; None: the embedding."""
    if point == "embedding":
        return None
    match = _LAYER_POINT.match(str(point))
    if match is None:
        raise TalanConfigError(
            f"TalanConfig: bad connection_point {point!r}; "
            "expected 'embedding' or 'layer_N' (N a 0-indexed decoder layer)"
        )
    return int(match.group(1))


def check_connection(point: str, num_layers: int) -> None:
    """Raise if ``point`` is not a place in a host of ``num_layers`` decoder layers."""
    layer = connection_layer(point)
    if layer is not None and layer >= num_layers:
        raise TalanConfigError(
            f"TALAN connection_point {point!r} does not fit the host model, which has "
            f"{num_layers} decoder layers (layer_0..layer_{num_layers - 1})"
        )


@dataclass
class TalanConfig:
    """Configuration of one TALAN block.

    Attributes:
        hidden_size: width ``d`` of the host's residual stream.
        connection_point: ``"embedding"`` or ``"layer_N"``, the residual stream leaving
            decoder layer N (0-indexed).
        n_themes: slot count ``T`` of the running summary.
        clustering_method: ``"attention"`` (dot-product slot queries) or ``"soft_mos"``
            (low-rank projection, slot queries and a learned slot prior).
        network_type: the remix family, one of ``NETWORK_TYPES``.
        mixer_dim: inner width ``r`` of the mixer (and of the soft_mos projection).
        num_heads: heads of the ``multihead_local`` attention; must divide ``mixer_dim``.
        integration_type: writeback rule, ``"direct"`` or ``"learned_gate"``.
        gate_type: ``"vector"`` (``v`` in R^d) or ``"scalar"`` learned gate.
        alpha: initial writeback strength (the direct alpha, or the gate's initial value).
        trainable: trainability scope tau: ``"all"``, ``"gate_only"`` or ``"frozen"``.
        grad_scale: gamma, multiplies gradients of non-gate TALAN parameters.
        freeze_steps: TALAN's output is identity for the first N optimizer steps.
        activate_steps: TALAN parameters stop training after step N (None: never).
        eps: denominator guard of the running summary.
        type: always ``"talan"``; kept so the paper's records load verbatim.
    """

    hidden_size: int
    connection_point: str = "embedding"
    n_themes: int = 2
    clustering_method: str = "attention"
    network_type: str = "multihead_local"
    mixer_dim: int = 64
    num_heads: int = 4
    integration_type: str = "learned_gate"
    gate_type: str = "vector"
    alpha: float = 0.008
    trainable: str = "all"
    grad_scale: float = 1.0
    freeze_steps: int = 0
    activate_steps: int | None = None
    eps: float = 1e-6
    type: str = field(default="talan")

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise TalanConfigError(f"TalanConfig: {message}")

        if self.type != "talan":
            fail(f"type must be 'talan', got {self.type!r}")
        if not isinstance(self.hidden_size, int) or self.hidden_size <= 0:
            fail(f"hidden_size must be a positive integer, got {self.hidden_size!r}")
        _ = self.layer_index  # raises on a malformed connection_point
        if not isinstance(self.n_themes, int) or self.n_themes < 1:
            fail(f"n_themes must be an integer >= 1, got {self.n_themes!r}")
        for name, allowed in (
            ("clustering_method", CLUSTERING_METHODS),
            ("network_type", NETWORK_TYPES),
            ("integration_type", INTEGRATION_TYPES),
            ("gate_type", GATE_TYPES),
            ("trainable", TRAINABLE_SCOPES),
        ):
            value = getattr(self, name)
            if value not in allowed:
                fail(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")
        if not isinstance(self.mixer_dim, int) or self.mixer_dim < 1:
            fail(f"mixer_dim must be an integer >= 1, got {self.mixer_dim!r}")
        if not isinstance(self.num_heads, int) or self.num_heads < 1:
            fail(f"num_heads must be an integer >= 1, got {self.num_heads!r}")
        if self.network_type == "multihead_local" and self.mixer_dim % self.num_heads:
            fail(f"num_heads ({self.num_heads}) must divide mixer_dim ({self.mixer_dim})")
        if not float(self.alpha) > 0:
            fail(f"alpha must be > 0, got {self.alpha!r}")
        if not float(self.grad_scale) > 0:
            fail(f"grad_scale must be > 0, got {self.grad_scale!r}")
        if not isinstance(self.freeze_steps, int) or self.freeze_steps < 0:
            fail(f"freeze_steps must be an integer >= 0, got {self.freeze_steps!r}")
        if self.activate_steps is not None and (
            not isinstance(self.activate_steps, int) or self.activate_steps < 0
        ):
            fail(f"activate_steps must be null or an integer >= 0, got {self.activate_steps!r}")
        if not float(self.eps) > 0:
            fail(f"eps must be > 0, got {self.eps!r}")
        self.alpha = float(self.alpha)
        self.grad_scale = float(self.grad_scale)
        self.eps = float(self.eps)

    @property
    def layer_index(self) -> int | None:
        """Decoder layer whose output TALAN rewrites; None for the embedding."""
        return connection_layer(self.connection_point)

    @property
    def state_shape(self) -> tuple[int, int]:
        """One request's running summary ``(N, D)``: ``(T, d + 1)`` (fp32, ``block.STATE_DTYPE``).

        The state contract every engine allocates per request (docs/design.md).
        """
        return (self.n_themes, self.hidden_size + 1)

    @property
    def state_size(self) -> int:
        """Floats per request of the running summary: T x (d + 1)."""
        return self.state_shape[0] * self.state_shape[1]

    def check_host(self, hidden_size: int, num_layers: int) -> None:
        """Raise if this config cannot be placed in a host of that shape."""
        if hidden_size != self.hidden_size:
            raise TalanConfigError(
                f"TALAN hidden_size {self.hidden_size} does not fit the host model, "
                f"whose hidden size is {hidden_size}"
            )
        check_connection(self.connection_point, num_layers)

    # --- JSON -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> TalanConfig:
        if not isinstance(record, dict):
            raise TalanConfigError(f"TalanConfig: expected a JSON object, got {type(record)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise TalanConfigError(
                f"TalanConfig: unknown field(s) {', '.join(unknown)}; "
                f"known fields are {', '.join(sorted(known))}"
            )
        if "hidden_size" not in record:
            raise TalanConfigError("TalanConfig: missing required field hidden_size")
        return cls(**record)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json_string())
        return path

    @classmethod
    def load(cls, path: str | Path) -> TalanConfig:
        """Read ``talan_config.json`` (or the file at ``path`` itself)."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise TalanConfigError(f"TalanConfig: {path} does not exist") from err
        except json.JSONDecodeError as err:
            raise TalanConfigError(f"TalanConfig: {path} is not valid JSON: {err}") from err
        return cls.from_dict(record)
