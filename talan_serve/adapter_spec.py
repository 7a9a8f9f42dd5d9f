"""What an engine sizes and wires at start for a set of TALAN adapters, and what fits it.

A server that holds many TALAN checkpoints on one base model keeps one running summary per
request, sized for the largest slot count T, and runs side paths at fixed connection
points; adapters of one kind (``kind_of``) share a fixed-capacity stack
(``talan_serve.stacks``). ``AdapterSetSpec`` is that sizing: the engine builds its
``TalanAdapterSet`` (``talan_serve.adapter_set``) from it, the prepared folder records it
(``talan_serve.prepared``) and the front end checks each new checkpoint against it.
docs/design.md ("Many adapters") says what one engine can hold.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from talan_serve.config import TalanConfig, check_connection, connection_layer
from talan_serve.stacks import stack_key


class AdapterSetError(ValueError):
    """An adapter that this set cannot hold (shape, slots, connection point, capacity)."""


def kind_of(config: TalanConfig) -> tuple:
    """What adapters share to be stacked together: their connection point and
    ``stacks.stack_key`` (everything but T and the weights)."""
    return (config.connection_point, stack_key(config))


@dataclass(frozen=True)
class AdapterSetSpec:
    """What an engine sizes and wires at start for a set of adapters: the residual width,
    the per-request state's slot count, where side paths run, how many adapters it holds
    at once, and the adapter kinds (``kind_of``) whose stacks it builds with the model."""

    hidden_size: int
    state_slots: int
    connection_points: tuple[str, ...]
    max_adapters: int = 1
    kinds: tuple[TalanConfig, ...] = ()

    def __post_init__(self) -> None:
        for point in self.connection_points:
            connection_layer(point)
        if self.state_slots < 1 or not self.connection_points or self.max_adapters < 1:
            raise AdapterSetError("an adapter set needs at least one state slot, one "
                                  "connection point and room for one adapter")

    @classmethod
    def covering(
        cls,
        configs: Sequence[TalanConfig],
        hidden_size: int,
        state_slots: int | None = None,
        connection_points: Sequence[str] = (),
        max_adapters: int = 1,
    ) -> AdapterSetSpec:
        """The smallest spec that holds ``configs`` (and the slots and points asked for),
        with the kinds among them."""
        slots = max([c.n_themes for c in configs] + [state_slots or 1])
        points = list(dict.fromkeys([*(c.connection_point for c in configs),
                                     *connection_points]))
        if not points:
            raise AdapterSetError("no connection point: give an adapter at start or "
                                  "--talan-connection-points")
        kinds: dict[tuple, TalanConfig] = {}
        for config in configs:
            kinds.setdefault(kind_of(config), replace(config, n_themes=slots))
        return cls(hidden_size, slots, tuple(points), max_adapters, tuple(kinds.values()))

    @property
    def state_shape(self) -> tuple[int, int]:
        return (self.state_slots, self.hidden_size + 1)

    @property
    def stacked(self) -> bool:
        """Whether adapters are held in fixed-capacity stacks (a set of more than one)."""
        return self.max_adapters > 1

    def check_host(self, hidden_size: int, num_layers: int) -> None:
        if hidden_size != self.hidden_size:
            raise AdapterSetError(f"TALAN hidden_size {self.hidden_size} does not fit the "
                                  f"host model, whose hidden size is {hidden_size}")
        for point in self.connection_points:
            check_connection(point, num_layers)

    def check(self, config: TalanConfig, kinds_fixed: bool = False) -> None:
        """Raise ``AdapterSetError`` if an adapter of ``config`` cannot join such a set;
        ``kinds_fixed``: only the kinds built at start can (the engine captures its
        decode steps in graphs that hold those stacks)."""
        if config.hidden_size != self.hidden_size:
            raise AdapterSetError(
                f"hidden_size {config.hidden_size} differs from the base model's "
                f"{self.hidden_size}")
        if config.n_themes > self.state_slots:
            raise AdapterSetError(
                f"n_themes {config.n_themes} is above the {self.state_slots} state slots "
                "this server was started with (raise --max-talan-slots)")
        if config.connection_point not in self.connection_points:
            raise AdapterSetError(
                f"connection_point {config.connection_point!r} is not one this server "
                f"runs a side path at ({', '.join(self.connection_points)}); add it with "
                "--talan-connection-points at start")
        if kinds_fixed and kind_of(config) not in {kind_of(k) for k in self.kinds}:
            raise AdapterSetError(fixed_kind_message(config, self.kinds))

    def to_dict(self) -> dict[str, object]:
        return {"hidden_size": self.hidden_size, "state_slots": self.state_slots,
                "connection_points": list(self.connection_points),
                "max_adapters": self.max_adapters,
                "kinds": [kind.to_dict() for kind in self.kinds]}

    @classmethod
    def from_dict(cls, record: dict[str, object]) -> AdapterSetSpec:
        return cls(int(record["hidden_size"]), int(record["state_slots"]),
                   tuple(record["connection_points"]), int(record.get("max_adapters", 1)),
                   tuple(TalanConfig.from_dict(dict(k)) for k in record.get("kinds", ())))

    @classmethod
    def of_config(cls, config: TalanConfig) -> AdapterSetSpec:
        """One checkpoint's set: its own slots and connection point."""
        return cls(config.hidden_size, config.n_themes, (config.connection_point,), 1,
                   (config,))


def fixed_kind_message(config: TalanConfig, kinds: Iterable[TalanConfig]) -> str:
    def name(c: TalanConfig) -> str:
        return f"{c.network_type}/{c.clustering_method}/{c.integration_type} at " \
               f"{c.connection_point}"

    known = ", ".join(name(k) for k in kinds) or "none"
    return (f"an adapter of kind {name(config)} cannot join: this server captures its "
            f"decode steps in CUDA graphs, which hold the adapter kinds it started with "
            f"({known}); start it with an adapter of this kind, or with --enforce-eager")
