"""The TALAN adapters of one engine: blocks by adapter id over one residual stream.

``TalanAdapterSet`` holds one ``TalanBlock`` per loaded adapter (and, for a set of more
than one, a fixed-capacity ``AdapterStack`` per kind), as its ``AdapterSetSpec`` sizes
them, and runs an engine step over a per-request state pool: each row through its own
adapter's block, following the step's plan (``talan_serve.step_plan``) or, in a captured
decode step, finding each row's adapter on the device. The math is the block's, unchanged;
this module only sends rows to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from talan_serve.adapter_spec import (
    AdapterSetError,
    AdapterSetSpec,
    fixed_kind_message,
    kind_of,
)
from talan_serve.block import TalanBlock
from talan_serve.config import TalanConfig
from talan_serve.stacks import AdapterStack, StackError
from talan_serve.step_plan import AdapterGroup, StepPlan


def initial_states(states: Tensor, indices: Tensor, resume: Tensor | None) -> Tensor:
    """The rows' states gathered from an engine's pool at their state indices; ``resume``
    (None: all) says which rows carry one in (a later chunk, a cached prefix), the others
    start at zero."""
    initial = states.index_select(0, indices)
    if resume is not None:
        # where(), not a product: a never-written pool entry may hold NaN garbage.
        initial = torch.where(resume.view(-1, 1, 1), initial, 0.0)
    return initial



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
        """Load one adapter's block (fp32, frozen) under ``adapter``. ``state_dict``'s
        tensors become its weights (not copied where device and dtype already match):
        the caller hands them over and does not change them afterwards."""
        self.check(config)
        if str(adapter) in self.blocks:
            raise AdapterSetError(f"adapter {adapter} is loaded already")
        with torch.device("meta"):  # no memory and no random init for what is replaced
            block = TalanBlock(config)
        block.load_state_dict(state_dict, strict=True, assign=True)
        block.requires_grad_(False)
        block = block.to(device=device, dtype=torch.float32)
        if self.spec.stacked:
            stack = self._stack_for(config)
            if stack is None:
                stack = self._new_stack(config, device)
            try:
                self.stack_of[adapter] = (stack, self.stacks[stack].put(adapter, block))
            except StackError as error:
                raise AdapterSetError(str(error)) from error
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
        if group.entries is not None:
            return self.stacks[group.adapter].block
        return self.block(group.adapter)

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
                                          entries=groups[0].entries)
        delta = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        final = initial_state.clone()
        for group in groups:
            block = self._block(group)
            themes = block.config.n_themes
            if group.rows is None:
                part, state = block.perturbation(hidden, group.cu_seqlens,
                                                 initial_state[:, :themes], entries=group.entries)
                delta = part
                final[:, :themes] = state
                continue
            tokens = group.rows if group.tokens is None else group.tokens
            initial = initial_state.index_select(0, group.rows)[:, :themes]
            part, state = block.perturbation(hidden.index_select(0, tokens), group.cu_seqlens,
                                             initial, entries=group.entries)
            delta.index_copy_(0, tokens, part)
            final[group.rows, :themes] = state
        return delta, final

    def step(
        self,
        hidden: Tensor,
        states: Tensor,
        indices: Tensor,
        point: str,
        *,
        cu_seqlens: Tensor | None = None,
        resume: Tensor | None = None,
        plan: StepPlan | None = None,
        row_adapters: Tensor | None = None,
    ) -> Tensor:
        """One engine step at ``point`` over its per-request state pool: fp32 ``X~ - X``
        for ``hidden``, with the rows' states (``states`` at their state ``indices``) read
        and written back in place. An eager step follows its ``plan`` (``plan_step``,
        built on the CPU); a captured one (``plan`` None: one token per row) finds each
        row's adapter in ``row_adapters`` on the device."""
        initial = initial_states(states, indices, resume)
        if plan is None:
            delta, final = self.dense_perturbation(hidden, initial, row_adapters, point)
            states.index_copy_(0, indices, final)
            return delta
        delta, final = self.perturbation(hidden, cu_seqlens, initial, plan.groups)
        if plan.owned is None:
            states.index_copy_(0, indices, final)
        else:
            states.index_copy_(0, indices.index_select(0, plan.owned),
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
                entries, mine = stack.entries_of(row_adapters)
                part, state = stack.block.perturbation(hidden, None, initial_state,
                                                       entries=entries)
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
