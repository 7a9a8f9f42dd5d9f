"""The plan of one engine step: which rows (and packed tokens) run which adapter.

Each step an engine says which adapter id every batch row runs (``NO_ADAPTER``: none, the
TALAN-off and the plain base-model request). ``plan_step`` turns that, on the CPU and
without a device sync, into one group of rows per adapter present at a connection point
(or one stacked group for the one-token rows of several adapters of a stack), and the rows
whose states that point writes back. ``TalanAdapterSet`` (``talan_serve.adapter_set``)
then runs each group through its block; the math stays the block's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from talan_serve.switch import NO_ADAPTER

# The fewest adapters of a stack present in a step for a stacked call to pay: below it,
# one small call per adapter is cheaper (bench/results/adapters_cpu_smollm2*.md).
MIN_STACKED = 3


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
    # A stacked group (one-token steps): ``adapter`` is the stack, ``entries`` each row's
    # entry in it (``talan_serve.stacks``).
    entries: Tensor | None = None


def plan_groups(
    row_adapters: np.ndarray,
    cu_seqlens_cpu: np.ndarray | None,
    cu_seqlens: Tensor | None,
    device: torch.device,
    adapters: Iterable[int] | None = None,
    stacks: Mapping[int, tuple[int, int]] | None = None,
) -> list[AdapterGroup]:
    """One group per adapter that some row runs, from CPU-side metadata (no device sync).

    Args:
        row_adapters: ``(num_reqs,)`` adapter id of every row, ``NO_ADAPTER`` for none.
        cu_seqlens_cpu: the step's ``(num_reqs + 1,)`` token offsets on the CPU, or None
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
        groups = _stacked_groups(row_adapters, present, stacks, cu_seqlens_cpu, device, taken)
    for adapter in present:
        mine = row_adapters == adapter
        rows = np.flatnonzero(mine & ~taken)
        if rows.shape[0] == 0:
            continue
        if rows.shape[0] == num_reqs:
            groups.append(AdapterGroup(adapter, None, None, cu_seqlens))
            continue
        tokens = sub_cu = None
        if cu_seqlens_cpu is not None:
            starts, ends = cu_seqlens_cpu[rows], cu_seqlens_cpu[rows + 1]
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
    cu_seqlens_cpu: np.ndarray | None,
    device: torch.device,
    taken: np.ndarray,
) -> list[AdapterGroup]:
    """Stacked groups of one-token rows; marks their rows in ``taken``."""
    single = (np.ones(row_adapters.shape[0], dtype=bool) if cu_seqlens_cpu is None
              else np.diff(cu_seqlens_cpu) == 1)
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
        entries = position[row_adapters]  # NO_ADAPTER reads the last position: -1
        rows = np.flatnonzero((entries >= 0) & single)
        if np.unique(entries[rows]).shape[0] < MIN_STACKED:
            continue
        taken[rows] = True
        whole = cu_seqlens_cpu is None and rows.shape[0] == row_adapters.shape[0]
        tokens = None if cu_seqlens_cpu is None else _to(cu_seqlens_cpu[rows], device)
        groups.append(AdapterGroup(stack, None if whole else _to(rows, device), tokens, None,
                                   _to(entries[rows], device)))
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
    cu_seqlens_cpu: np.ndarray | None,
    cu_seqlens: Tensor | None,
    device: torch.device,
    adapters: Sequence[int],
    stacks: Mapping[int, tuple[int, int]] | None = None,
) -> StepPlan:
    """``plan_groups`` for the ``adapters`` at one point, and the rows that point owns:
    its adapters' and those running none (whose states it keeps as they are)."""
    groups = plan_groups(row_adapters, cu_seqlens_cpu, cu_seqlens, device, adapters, stacks)
    owned = np.isin(row_adapters, [*adapters, NO_ADAPTER])
    return StepPlan(groups, None if owned.all() else _to(np.flatnonzero(owned), device))


def fit_rows(rows: np.ndarray, count: int) -> np.ndarray:
    """The step's adapter ids (on the CPU) for ``count`` batch rows: rows the engine's
    switch has not seen (padding, a dummy step) run nothing."""
    if rows.shape[0] == count:
        return rows
    fitted = np.full(count, NO_ADAPTER, dtype=np.int64)
    fitted[: min(count, rows.shape[0])] = rows[:count]
    return fitted


def _to(array: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(array.astype(np.int64, copy=False)).to(device, non_blocking=True)
