"""Stacked blocks: the adapters of one kind in one block of fixed capacity (serving only).

A stacked block is a ``TalanBlock`` whose parameters carry a leading entry dimension:
``perturbation(..., entries=...)`` runs each token through its own entry's weights, in one
matmul over all of them (at decode sizes one op over A entries costs less than A ops).
Blocks stack when they share everything but the slot count T and their weights
(``stack_key``); the slot-indexed weights are padded to the stack's T, and the padding
slots are masked out of the assignment and the mixer's attention, so they never receive
mass. An ``AdapterStack`` keeps one such block for a server of many adapters: loading
fills a free entry in place, so a CUDA graph captured over it serves adapters loaded after
the capture. docs/design.md ("Many adapters").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from talan_serve.block import TalanBlock
from talan_serve.config import TalanConfig

# The fields adapters of one stack may differ in: T (padded), their weights (alpha is one)
# and what only training reads.
_FREE_FIELDS = ("n_themes", "alpha", "trainable", "grad_scale", "freeze_steps",
                "activate_steps", "connection_point")


class StackError(ValueError):
    """A block that does not fit a stack (another kind, more slots, no free entry)."""


def stack_key(config: TalanConfig) -> tuple:
    """What blocks must share to be stacked: every field but the slot count and alpha (the
    slot-indexed weights are padded; alpha is a weight like any other)."""
    fields = config.to_dict()
    for free in _FREE_FIELDS:
        fields.pop(free)
    return tuple(sorted(fields.items()))


def _pad_slots(name: str, param: Tensor, themes: int) -> Tensor:
    """The slot-indexed weights (slot queries and prior) padded with zeros to ``themes``."""
    if name.startswith("summarize.slot_"):
        return F.pad(param, (0, 0) * (param.dim() - 1) + (0, themes - param.shape[0]))
    return param


def empty_stack(config: TalanConfig, capacity: int, n_themes: int | None = None) -> TalanBlock:
    """A stacked block of ``capacity`` empty entries of ``config``'s kind. An empty entry
    has zero weights and one live slot: it is finite, never NaN, for the rows a dense step
    sends to it and then discards."""
    themes = n_themes or config.n_themes
    stack = TalanBlock(replace(config, n_themes=themes))
    stack.requires_grad_(False)
    for name, param in list(stack.named_parameters()):
        module_name, _, leaf = name.rpartition(".")
        module = stack.get_submodule(module_name) if module_name else stack
        # fp32 whatever the default dtype an engine builds its model under.
        setattr(module, leaf, nn.Parameter(
            param.new_zeros(capacity, *param.shape, dtype=torch.float32),
            requires_grad=False))
    mask = torch.zeros(capacity, themes, dtype=torch.bool)
    mask[:, 0] = True
    stack.register_buffer("slot_mask", mask, persistent=False)
    return stack


@torch.no_grad()
def put_block(stack: TalanBlock, position: int, block: TalanBlock) -> None:
    """Copy ``block``'s weights into entry ``position`` of ``stack``, in place."""
    if stack_key(block.config) != stack_key(stack.config):
        raise StackError("a block of another kind cannot join this stack")
    themes = stack.config.n_themes
    if block.config.n_themes > themes:
        raise StackError(f"a block of {block.config.n_themes} slots does not fit a "
                         f"stack of {themes}")
    for name, param in stack.named_parameters():
        param[position].copy_(_pad_slots(name, block.get_parameter(name).detach(), themes))
    stack.slot_mask[position] = torch.arange(themes, device=stack.slot_mask.device) \
        < block.config.n_themes


def stack_blocks(blocks: Sequence[TalanBlock], capacity: int | None = None,
                 n_themes: int | None = None) -> TalanBlock:
    """One stacked block holding ``blocks``' weights, entry i = ``blocks[i]``.

    ``capacity`` (default: the blocks given) and ``n_themes`` (default: their largest T)
    size the stack: ``put_block`` fills an entry in place, so a stack with room to spare
    takes blocks later without new tensors (what a captured CUDA graph reads).
    """
    keys = {stack_key(block.config) for block in blocks}
    if len(keys) != 1:
        raise StackError(f"blocks of different kinds cannot be stacked: {keys}")
    themes = n_themes or max(block.config.n_themes for block in blocks)
    stack = empty_stack(blocks[0].config, capacity or len(blocks), themes)
    stack.to(next(blocks[0].parameters()).device)
    for position, block in enumerate(blocks):
        put_block(stack, position, block)
    return stack


class AdapterStack(nn.Module):
    """The adapters of one kind (``adapter_spec.kind_of``) in one stacked block of fixed
    capacity.

    Loading fills a free entry in place and unloading frees it, so the stack's tensors
    never change: a CUDA graph captured over it serves adapters loaded after the capture.
    ``ids`` says which adapter id each entry holds (``EMPTY``: none), on the device, so
    that a captured step finds each row's entry without the CPU.
    """

    EMPTY = -2  # never a row's adapter id (those are >= 0, or NO_ADAPTER)

    def __init__(self, kind: TalanConfig, capacity: int):
        super().__init__()
        self.kind = kind
        self.block = empty_stack(kind, capacity)
        self.register_buffer("ids", torch.full((capacity,), self.EMPTY, dtype=torch.long),
                             persistent=False)
        self.positions: dict[int, int] = {}

    @property
    def point(self) -> str:
        return self.kind.connection_point

    def put(self, adapter: int, block: TalanBlock) -> int:
        """Load ``block`` as ``adapter`` into a free entry; the entry."""
        free = [i for i in range(self.ids.shape[0]) if i not in self.positions.values()]
        if not free:
            raise StackError(f"the stack of this adapter's kind is full "
                             f"({self.ids.shape[0]} adapters)")
        put_block(self.block, free[0], block)
        self.ids[free[0]] = adapter
        self.positions[adapter] = free[0]
        return free[0]

    def take(self, adapter: int) -> None:
        position = self.positions.pop(adapter, None)
        if position is not None:
            self.ids[position] = self.EMPTY

    def entries_of(self, row_adapters: Tensor) -> tuple[Tensor, Tensor]:
        """Each row's entry (0 for rows of no adapter here) and whether it has one."""
        match = row_adapters.unsqueeze(1) == self.ids
        return match.to(torch.int8).argmax(dim=1), match.any(dim=1)
