"""The side path's step over an engine's per-request state pool, whatever the engine.

An engine keeps one TALAN state per request in a pool and gives each step's rows their
state indices, their token offsets and whether they carry a state in; the plugin turns its
metadata into a ``StepBatch`` and calls ``SidePath.step`` once per connection point. The
step then

* plans, on the CPU, which rows run which adapter (``talan_serve.step_plan``; a decode
  step's plan is kept while its rows and the loaded adapters stay the same),
* returns zeros when no row runs an adapter there (nothing to compute, no state to move),
* under CUDA graph capture, seals the adapter set and reads each row's adapter on the
  device instead (a captured graph replays whatever the requests and adapters become),
* runs ``TalanAdapterSet.step`` on the real tokens and pads the delta to the stream.

Nothing here imports an engine: ``bench/gpu_block_check.py`` captures this very step in a
CUDA graph where no engine is installed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from talan_serve.adapter_set import TalanAdapterSet
from talan_serve.adapter_spec import AdapterSetError
from talan_serve.checkpoint import load_checkpoint
from talan_serve.config import TalanConfig
from talan_serve.step_plan import StepPlan, fit_rows, plan_step


@dataclass
class StepBatch:
    """One step's batch at a connection point, as an engine's metadata gives it."""

    # The engine's state pool, (pool entries, T, d + 1) fp32, written in place.
    states: Tensor
    # (rows,) each row's state index in the pool (>= 0; padding rows: a scratch entry).
    indices: Tensor
    # Real tokens of the step; the stream may be padded beyond them.
    num_tokens: int
    # (rows + 1,) token offsets, and their CPU copy; None: one token per row.
    cu_seqlens: Tensor | None = None
    cu_seqlens_cpu: np.ndarray | None = None
    # (rows,) bool: the row carries a state in (a later chunk, a cached prefix); None: all.
    resume: Tensor | None = None
    # Each row's adapter id on the CPU (what the plan reads); None: only on the device.
    rows_cpu: np.ndarray | None = None
    # Each row's adapter id on the device, built when a step needs it (captured steps).
    rows_device: Callable[[], Tensor] | None = None


def capturing(tensor: Tensor) -> bool:
    """Whether a CUDA graph is being captured on ``tensor``'s stream."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


class SidePath(nn.Module):
    """The TALAN adapters of one model inside an engine, and their step (module docstring).

    One checkpoint is a set of one adapter (id 0); a server of many adapters loads them at
    run time (``load``). Every request has one state, sized for the set's largest T,
    whichever connection point its adapter uses.
    """

    def __init__(self, adapters: TalanAdapterSet):
        super().__init__()
        self.adapters = adapters
        # point -> (the rows it was planned for, the plan): one-token steps only.
        self._decode_plans: dict[str, tuple[np.ndarray, StepPlan]] = {}

    # --- adapters ----------------------------------------------------------------------

    def add(self, adapter: int, config: TalanConfig, state_dict: dict[str, Tensor],
            device: torch.device | str | None) -> None:
        self.adapters.add(adapter, config, state_dict, device=device)
        self._decode_plans = {}

    def load(self, adapter: int, checkpoint_dir: str | Path,
             device: torch.device | str | None) -> None:
        """Load a checkpoint's TALAN block as ``adapter`` at run time, validated by
        ``load_checkpoint`` (checksums, config, every tensor); its LoRA is the engine's."""
        checkpoint = load_checkpoint(checkpoint_dir)
        if not checkpoint.has_talan:
            raise AdapterSetError(f"{checkpoint_dir}: the checkpoint has no TALAN block")
        self.add(adapter, checkpoint.config, checkpoint.state_dict, device)

    def unload(self, adapter: int) -> None:
        self.adapters.remove(adapter)
        self._decode_plans = {}

    def loaded(self) -> list[int]:
        return sorted(int(key) for key in self.adapters.blocks)

    # --- the step ------------------------------------------------------------------------

    def _plan(self, batch: StepBatch, point: str, device: torch.device) -> StepPlan:
        rows = fit_rows(batch.rows_cpu, batch.indices.shape[0])
        adapters, stacks = self.adapters.adapters_at(point), self.adapters.stack_of
        if batch.cu_seqlens is not None:
            return plan_step(rows, batch.cu_seqlens_cpu, batch.cu_seqlens, device, adapters,
                             stacks)
        # A one-token step's plan depends on its rows only: kept until they change.
        kept = self._decode_plans.get(point)
        if kept is not None and np.array_equal(kept[0], rows):
            return kept[1]
        plan = plan_step(rows, None, None, device, adapters, stacks)
        self._decode_plans[point] = (rows.copy(), plan)
        return plan

    def step(self, stream: Tensor, point: str, batch: StepBatch) -> Tensor:
        """``X~ - X`` at connection ``point``, in ``stream``'s shape and dtype: zero for
        rows whose adapter is elsewhere or none, and for padding."""
        graph = capturing(stream)
        plan = None
        if not graph and batch.rows_cpu is not None:
            plan = self._plan(batch, point, stream.device)
            if not plan.groups:
                return torch.zeros_like(stream)
        rows = None
        if plan is None:
            if graph:
                # A captured graph holds every stack at this point: no new kinds from now.
                self.adapters.seal()
            rows = batch.rows_device()
        hidden = stream if batch.num_tokens == stream.shape[0] else stream[:batch.num_tokens]
        delta = self.adapters.step(hidden, batch.states, batch.indices, point,
                                   cu_seqlens=batch.cu_seqlens, resume=batch.resume,
                                   plan=plan, row_adapters=rows).to(stream.dtype)
        # Python-int branch only: shapes are static under graph capture.
        if batch.num_tokens < stream.shape[0]:
            delta = F.pad(delta, (0, 0, 0, stream.shape[0] - batch.num_tokens))
        return delta

    def profile(self, stream: Tensor, point: str) -> Tensor:
        """A profiling (dummy) step without metadata: one fresh sequence through the first
        adapter at ``point``, so that memory use is realistic; zeros with none there."""
        adapters = self.adapters.adapters_at(point)
        if not adapters:
            return torch.zeros_like(stream)
        cu = torch.tensor([0, stream.shape[0]], device=stream.device, dtype=torch.long)
        block = self.adapters.block(adapters[0])
        return block.perturbation(stream, cu)[0].to(stream.dtype)
