"""Several TALAN adapters over one residual stream, each batch row running its own.

A server that holds many TALAN checkpoints on one base model keeps their blocks in one
``TalanAdapterSet`` and one running summary per request, sized for the largest slot
count: an adapter with fewer slots reads and writes the leading ``T`` of them, so the
slots beyond its own never receive mass. Each step the engine says which adapter every
row runs (-1: none, which is the TALAN-off and the plain base-model request), and
``plan_groups`` turns that, on the host, into one group of rows (and their packed tokens)
per adapter present. ``TalanAdapterSet.perturbation`` then runs each group through its own
``TalanBlock.perturbation``: the math is the block's, unchanged; this module only routes
rows to it. docs/design.md ("Many adapters") says what an engine instance can hold.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn

from talan_serve.block import STATE_DTYPE, TalanBlock, stack_key
from talan_serve.config import TalanConfig, check_connection, connection_layer

NO_ADAPTER = -1
# The fewest adapters of a stack present in a step for a stacked call to pay: below it,
# one small call per adapter is cheaper (bench/results/adapters_cpu_smollm2*.md).
MIN_STACKED = 3


class AdapterSetError(ValueError):
    """An adapter that this set cannot hold (shape, slots, connection point, capacity)."""


def kind_of(config: TalanConfig) -> tuple:
    """What adapters share to be stacked together: their connection point and
    ``block.stack_key`` (everything but T and the weights)."""
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

    def build(self) -> TalanAdapterSet:
        return TalanAdapterSet(self)

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


@dataclass(frozen=True)
class AdapterGroup:
    """The rows of one step that run one adapter.

    ``rows`` None: every row of the step. ``tokens``: the rows' packed token positions
    (None: one token per row, so the same as ``rows``; or every token). ``cu_seqlens``:
    the group's own sequence offsets (None for a one-token-per-row step).
    """

    adapter: int
    rows: Tensor | None
    tokens: Tensor | None
    cu_seqlens: Tensor | None
    # A stacked group (one-token steps): ``adapter`` is the stack, ``route`` each row's
    # adapter in it (``TalanBlock.stacked``).
    route: Tensor | None = None


def plan_groups(
    row_adapters: np.ndarray,
    cu_seqlens_host: np.ndarray | None,
    cu_seqlens: Tensor | None,
    device: torch.device,
    adapters: Iterable[int] | None = None,
    stacks: Mapping[int, tuple[int, int]] | None = None,
) -> list[AdapterGroup]:
    """One group per adapter that some row runs, from host-side metadata (no device sync).

    Args:
        row_adapters: ``(num_reqs,)`` adapter id of every row, ``NO_ADAPTER`` for none.
        cu_seqlens_host: the step's ``(num_reqs + 1,)`` token offsets on the host, or None
            for a step of one token per row.
        cu_seqlens: the same offsets on the device (reused when one group has every row).
        adapters: only plan these adapter ids (those connected at the calling point).
        stacks: adapter id -> (stack, position in it): the one-token rows (decodes) of
            ``MIN_STACKED`` or more adapters of a stack make one stacked group.
    """
    wanted = None if adapters is None else set(adapters)
    present = [int(a) for a in np.unique(row_adapters) if a != NO_ADAPTER]
    present = [a for a in present if wanted is None or a in wanted]
    num_reqs = row_adapters.shape[0]
    groups: list[AdapterGroup] = []
    taken = np.zeros(num_reqs, dtype=bool)
    if stacks:
        groups = _stacked_groups(row_adapters, present, stacks, cu_seqlens_host, device, taken)
    for adapter in present:
        mine = row_adapters == adapter
        rows = np.flatnonzero(mine & ~taken)
        if rows.shape[0] == 0:
            continue
        if rows.shape[0] == num_reqs:
            groups.append(AdapterGroup(adapter, None, None, cu_seqlens))
            continue
        tokens = sub_cu = None
        if cu_seqlens_host is not None:
            starts, ends = cu_seqlens_host[rows], cu_seqlens_host[rows + 1]
            lengths = ends - starts
            sub_cu = np.zeros(rows.shape[0] + 1, dtype=np.int64)
            np.cumsum(lengths, out=sub_cu[1:])
            # Each row's token range, concatenated: start of the row + offset inside it.
            tokens = np.repeat(starts - sub_cu[:-1], lengths) + np.arange(sub_cu[-1])
            tokens, sub_cu = _to(tokens, device), _to(sub_cu, device)
        groups.append(AdapterGroup(adapter, _to(rows, device), tokens, sub_cu))
    return groups


def _stacked_groups(
    row_adapters: np.ndarray,
    present: list[int],
    stacks: Mapping[int, tuple[int, int]],
    cu_seqlens_host: np.ndarray | None,
    device: torch.device,
    taken: np.ndarray,
) -> list[AdapterGroup]:
    """Stacked groups of one-token rows; marks their rows in ``taken``."""
    single = (np.ones(row_adapters.shape[0], dtype=bool) if cu_seqlens_host is None
              else np.diff(cu_seqlens_host) == 1)
    members: dict[int, list[int]] = {}
    for adapter in present:
        if adapter in stacks:
            members.setdefault(stacks[adapter][0], []).append(adapter)
    groups = []
    for stack, adapters in members.items():
        if len(adapters) < MIN_STACKED:
            continue
        position = np.full(int(row_adapters.max()) + 2, -1, dtype=np.int64)
        for adapter in adapters:
            position[adapter] = stacks[adapter][1]
        routes = position[row_adapters]  # NO_ADAPTER reads the last entry: -1
        rows = np.flatnonzero((routes >= 0) & single)
        if np.unique(routes[rows]).shape[0] < MIN_STACKED:
            continue
        taken[rows] = True
        whole = cu_seqlens_host is None and rows.shape[0] == row_adapters.shape[0]
        tokens = None if cu_seqlens_host is None else _to(cu_seqlens_host[rows], device)
        groups.append(AdapterGroup(stack, None if whole else _to(rows, device), tokens, None,
                                   _to(routes[rows], device)))
    return groups


@dataclass(frozen=True)
class StepPlan:
    """One connection point's share of a step: its adapters' groups, and the rows whose
    states it writes back (None: every row). Rows of an adapter at another point are not
    its own: that point may have written their states earlier in the same step."""

    groups: list[AdapterGroup]
    owned: Tensor | None


def plan_step(
    row_adapters: np.ndarray,
    cu_seqlens_host: np.ndarray | None,
    cu_seqlens: Tensor | None,
    device: torch.device,
    adapters: Sequence[int],
    stacks: Mapping[int, tuple[int, int]] | None = None,
) -> StepPlan:
    """``plan_groups`` for the ``adapters`` at one point, and the rows that point owns:
    its adapters' and those running none (whose states it keeps as they are)."""
    groups = plan_groups(row_adapters, cu_seqlens_host, cu_seqlens, device, adapters, stacks)
    owned = np.isin(row_adapters, [*adapters, NO_ADAPTER])
    return StepPlan(groups, None if owned.all() else _to(np.flatnonzero(owned), device))


def fit_rows(rows: np.ndarray, count: int) -> np.ndarray:
    """The step's host adapter ids for ``count`` batch rows: rows the engine's switch has
    not seen (padding, a dummy step) run nothing."""
    if rows.shape[0] == count:
        return rows
    fitted = np.full(count, NO_ADAPTER, dtype=np.int64)
    fitted[: min(count, rows.shape[0])] = rows[:count]
    return fitted


def initial_states(states: Tensor, slots: Tensor, resume: Tensor | None) -> Tensor:
    """The rows' states gathered from an engine's pool by slot; ``resume`` (None: all)
    says which rows carry one in (a later chunk, a cached prefix), the others start at
    zero."""
    initial = states.index_select(0, slots)
    if resume is not None:
        # where(), not a product: a never-written slot may hold NaN garbage.
        initial = torch.where(resume.view(-1, 1, 1), initial, 0.0)
    return initial


def _to(array: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(array.astype(np.int64, copy=False)).to(device, non_blocking=True)


class AdapterStack(nn.Module):
    """The adapters of one kind (``kind_of``) in one stacked block of fixed capacity.

    Loading fills a free entry in place and unloading frees it, so the stack's tensors
    never change: a CUDA graph captured over it serves adapters loaded after the capture.
    ``ids`` says which adapter each entry holds (``EMPTY``: none), on the device, so that
    a captured step finds each row's entry without the host.
    """

    EMPTY = -2  # never a row's adapter id (those are >= 0, or NO_ADAPTER)

    def __init__(self, kind: TalanConfig, capacity: int):
        super().__init__()
        self.kind = kind
        self.block = TalanBlock.empty_stack(kind, capacity)
        self.register_buffer("ids", torch.full((capacity,), self.EMPTY, dtype=torch.long),
                             persistent=False)
        self.positions: dict[int, int] = {}

    @property
    def point(self) -> str:
        return self.kind.connection_point

    def put(self, adapter: int, block: TalanBlock) -> int:
        free = [i for i in range(self.ids.shape[0]) if i not in self.positions.values()]
        if not free:
            raise AdapterSetError(f"the stack of this adapter's kind is full "
                                  f"({self.ids.shape[0]} adapters)")
        self.block.put(free[0], block)
        self.ids[free[0]] = adapter
        self.positions[adapter] = free[0]
        return free[0]

    def take(self, adapter: int) -> None:
        position = self.positions.pop(adapter, None)
        if position is not None:
            self.ids[position] = self.EMPTY

    def routes(self, row_adapters: Tensor) -> tuple[Tensor, Tensor]:
        """Each row's entry (0 for rows of no adapter here) and whether it has one."""
        match = row_adapters.unsqueeze(1) == self.ids
        return match.to(torch.int8).argmax(dim=1), match.any(dim=1)


class TalanAdapterSet(nn.Module):
    """TALAN blocks by adapter id, as ``spec`` sizes and wires them: the residual width,
    the ``T`` of the shared per-request state, the connection points (an adapter must
    use one of them), and, for a set of more than one, a fixed-capacity ``AdapterStack``
    per kind (those of ``spec.kinds`` built at once, others when their first adapter
    comes, until ``seal``)."""

    def __init__(self, spec: AdapterSetSpec):
        super().__init__()
        self.spec = spec
        self.blocks = nn.ModuleDict()
        self.stacks = nn.ModuleList()
        # adapter id -> (its stack, its entry), for the stacked calls of eager steps.
        self.stack_of: dict[int, tuple[int, int]] = {}
        self._at_point: dict[str, list[int]] = {}
        self.kinds_fixed = False
        if spec.stacked:
            for kind in spec.kinds:
                self._new_stack(kind)

    @property
    def state_slots(self) -> int:
        return self.spec.state_slots

    @property
    def state_shape(self) -> tuple[int, int]:
        return self.spec.state_shape

    def seal(self) -> None:
        """No new kinds from now on: a captured graph holds the stacks there are."""
        self.kinds_fixed = True

    def _stack_for(self, config: TalanConfig) -> int | None:
        kind = kind_of(config)
        return next((i for i, stack in enumerate(self.stacks)
                     if kind_of(stack.kind) == kind), None)

    def _new_stack(self, kind: TalanConfig, device: torch.device | str | None = None) -> int:
        stack = AdapterStack(replace(kind, n_themes=self.state_slots), self.spec.max_adapters)
        self.stacks.append(stack.to(device))
        return len(self.stacks) - 1

    def check(self, config: TalanConfig) -> None:
        """Raise ``AdapterSetError`` if ``config`` cannot join this set."""
        self.spec.check(config)
        if self.kinds_fixed and self.spec.stacked and self._stack_for(config) is None:
            raise AdapterSetError(fixed_kind_message(config, [s.kind for s in self.stacks]))

    def add(
        self,
        adapter: int,
        config: TalanConfig,
        state_dict: dict[str, Tensor],
        device: torch.device | str | None = None,
    ) -> None:
        """Load one adapter's block (fp32, frozen) under ``adapter``."""
        self.check(config)
        if str(adapter) in self.blocks:
            raise AdapterSetError(f"adapter {adapter} is loaded already")
        block = TalanBlock(config)
        block.load_state_dict(state_dict, strict=True)
        block.requires_grad_(False)
        block = block.to(device=device, dtype=torch.float32)
        if self.spec.stacked:
            stack = self._stack_for(config)
            if stack is None:
                stack = self._new_stack(config, device)
            self.stack_of[adapter] = (stack, self.stacks[stack].put(adapter, block))
        self.blocks[str(adapter)] = block
        self._at_point.setdefault(config.connection_point, []).append(adapter)

    def remove(self, adapter: int) -> None:
        if str(adapter) not in self.blocks:
            return
        point = self.block(adapter).config.connection_point
        del self.blocks[str(adapter)]
        self._at_point[point].remove(adapter)
        place = self.stack_of.pop(adapter, None)
        if place is not None:
            self.stacks[place[0]].take(adapter)

    def adapters_at(self, point: str) -> list[int]:
        return self._at_point.get(point, [])

    def block(self, adapter: int) -> TalanBlock:
        return self.blocks[str(adapter)]

    def _block(self, group: AdapterGroup) -> TalanBlock:
        if group.route is not None:
            return self.stacks[group.adapter].block
        return self.block(group.adapter)

    def empty_state(self, num_seqs: int, device: torch.device | str | None = None) -> Tensor:
        return torch.zeros(num_seqs, *self.state_shape, dtype=STATE_DTYPE, device=device)

    def perturbation(
        self,
        hidden: Tensor,
        cu_seqlens: Tensor | None,
        initial_state: Tensor,
        groups: Sequence[AdapterGroup],
    ) -> tuple[Tensor, Tensor]:
        """fp32 ``X~ - X`` for the packed tokens and every row's state after them.

        Rows in no group get a zero delta and keep their state: the adapter-only model.
        """
        slots = self.state_slots
        if len(groups) == 1 and groups[0].rows is None:
            block = self._block(groups[0])
            if block.config.n_themes == slots:
                return block.perturbation(hidden, cu_seqlens, initial_state,
                                          route=groups[0].route)
        delta = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        final = initial_state.clone()
        for group in groups:
            block = self._block(group)
            themes = block.config.n_themes
            if group.rows is None:
                part, state = block.perturbation(hidden, group.cu_seqlens,
                                                 initial_state[:, :themes], route=group.route)
                delta = part
                final[:, :themes] = state
                continue
            tokens = group.rows if group.tokens is None else group.tokens
            initial = initial_state.index_select(0, group.rows)[:, :themes]
            part, state = block.perturbation(hidden.index_select(0, tokens), group.cu_seqlens,
                                             initial, route=group.route)
            delta.index_copy_(0, tokens, part)
            final[group.rows, :themes] = state
        return delta, final

    def step(
        self,
        hidden: Tensor,
        states: Tensor,
        slots: Tensor,
        point: str,
        *,
        cu_seqlens: Tensor | None = None,
        resume: Tensor | None = None,
        plan: StepPlan | None = None,
        row_adapters: Tensor | None = None,
    ) -> Tensor:
        """One engine step at ``point`` over its per-request state pool: fp32 ``X~ - X``
        for ``hidden``, with the rows' states (``states`` by ``slots``) read and written
        back in place. An eager step follows its ``plan`` (``plan_step``, built on the
        host); a captured one (``plan`` None: one token per row) finds each row's adapter
        in ``row_adapters`` on the device."""
        initial = initial_states(states, slots, resume)
        if plan is None:
            delta, final = self.dense_perturbation(hidden, initial, row_adapters, point)
            states.index_copy_(0, slots, final)
            return delta
        delta, final = self.perturbation(hidden, cu_seqlens, initial, plan.groups)
        if plan.owned is None:
            states.index_copy_(0, slots, final)
        else:
            states.index_copy_(0, slots.index_select(0, plan.owned),
                               final.index_select(0, plan.owned))
        return delta

    def dense_perturbation(
        self,
        hidden: Tensor,
        initial_state: Tensor,
        row_adapters: Tensor,
        point: str,
    ) -> tuple[Tensor, Tensor]:
        """``perturbation`` of a one-token-per-row step at ``point`` with static shapes,
        for CUDA graph capture: each row's adapter is found on the device from
        ``row_adapters``, and every row keeps its own adapter's result (a device-side
        choice). A set of many runs one stacked call per stack at the point, so adapters
        loaded into a stack after the capture are served by the captured graph; a set of
        one runs its block."""
        delta = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        final = initial_state
        if self.spec.stacked:
            for stack in self.stacks:
                if stack.point != point:
                    continue
                entries, mine = stack.routes(row_adapters)
                part, state = stack.block.perturbation(hidden, None, initial_state,
                                                       route=entries)
                delta = torch.where(mine.view(-1, 1), part, delta)
                final = torch.where(mine.view(-1, 1, 1), state, final)
            return delta, final
        for adapter in self.adapters_at(point):
            block = self.block(adapter)
            themes = block.config.n_themes
            part, state = block.perturbation(hidden, None, initial_state[:, :themes])
            mine = (row_adapters == adapter).view(-1, 1, 1)
            delta = torch.where(mine.view(-1, 1), part, delta)
            final = torch.cat([torch.where(mine, state, final[:, :themes]),
                               final[:, themes:]], dim=1)
        return delta, final
