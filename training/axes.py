"""TALAN's training-time axes as a ``TrainerCallback``, and their arm at the optimizer.

Steps are counted from 1 (the first optimizer update is step 1), so with ``k`` steps:
- ``freeze_steps=k``: the block is the identity (its placement's off switch) during the
  forward/backward passes of steps 1..k; it acts from step k+1 on.
- ``activate_steps=k``: TALAN parameters are updated by steps 1..k only (the paper's
  Q8B record: "trainable for steps 0-19, frozen for steps 20-77", 0-indexed).
- ``trainable`` (tau): which parameters ever get gradients (``trainable.apply_scope``).
- ``grad_scale`` (gamma): multiplies the gradients of the block's ``body`` group (not the
  gate/alpha) after gradient clipping, right before the update. Clipping first keeps the
  adapter's clip factor from being dominated by a 500x-1000x boost.

The switch and the scope are set in ``on_step_begin``. Gamma, and leaving the block's
parameters alone in a step that does not train them, happen in a step pre-hook of the
torch optimizer itself (``TalanAxes.attach``): every engine calls that optimizer after its
own clipping, including DeepSpeed, whose update runs inside ``backward`` before any
callback could see the gradients. A step that does not train the block drops its
gradients there, so the optimizer skips its parameters entirely (no moment, no step
count, no weight decay), as it does when they got no gradient at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

from talan_serve.block import TalanBlock
from talan_serve.trainable import apply_scope, parameter_groups

# The optimizer group key that marks TALAN's groups ("body" or "gate").
GROUP_KEY = "talan"


@dataclass
class StepFlags:
    talan_active: bool = False    # the block acts in this step's forward
    talan_training: bool = False  # this step updates some of its parameters


@dataclass
class TalanAxes:
    """The axes of one run's block (None: a LoRA-only run, every call a no-op)."""

    block: TalanBlock | None
    flags: StepFlags = field(default_factory=StepFlags)

    def begin_step(self, step: int) -> StepFlags:
        """Set the block's switch and trainability for optimizer step ``step`` (1-based)."""
        if self.block is None:
            self.flags = StepFlags()
            return self.flags
        config = self.block.config
        active = step > config.freeze_steps
        self.block.placement.enabled = active
        training = config.activate_steps is None or step <= config.activate_steps
        apply_scope(self.block, config.trainable if training else "frozen")
        self.flags = StepFlags(active, active and training and config.trainable != "frozen")
        return self.flags

    def param_groups(self, model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: the adapter's (decay / no decay) and TALAN's own, tagged with
        ``GROUP_KEY`` so the step hook finds them whatever an engine does to the groups.
        No weight decay on biases and norm weights (HF Trainer's rule)."""
        talan = {}
        if self.block is not None:
            for part, params in parameter_groups(self.block).items():
                talan.update({id(p): part for p in params})
        buckets: dict[tuple[str | None, bool], list[torch.nn.Parameter]] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            decays = not ("bias" in name or "norm" in name.lower())
            buckets.setdefault((talan.get(id(param)), decays), []).append(param)
        groups = []
        for (part, decays), params in buckets.items():
            group: dict[str, Any] = {"params": params,
                                     "weight_decay": weight_decay if decays else 0.0}
            if part is not None:
                group[GROUP_KEY] = part
            groups.append(group)
        return groups

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Run ``before_update`` inside every ``optimizer.step()``."""
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.before_update(opt))

    def before_update(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients are final (accumulated, reduced, clipped): apply gamma, or drop the
        block's gradients in a step that does not train it."""
        if self.block is None:
            return
        gamma = self.block.config.grad_scale
        for group in optimizer.param_groups:
            part = group.get(GROUP_KEY)
            if part is None:
                continue
            for param in group["params"]:
                if param.grad is None:
                    continue
                if not self.flags.talan_training:
                    param.grad = None
                elif part == "body" and gamma != 1.0:
                    param.grad.mul_(gamma)

    def finish(self) -> None:
        """After training: the block acts (the checkpoint is served with TALAN on)."""
        if self.block is not None:
            self.block.placement.enabled = True
            apply_scope(self.block)


class TalanAxesCallback(TrainerCallback):
    """The Trainer's view of ``TalanAxes``: switch and scope per step, and the block back
    on with its own scope at the start (PEFT's wrapping froze every non-adapter tensor)."""

    def __init__(self, axes: TalanAxes):
        self.axes = axes

    def on_train_begin(self, args, state, control, **kwargs):
        if self.axes.block is not None:
            self.axes.block.placement.enabled = True
            apply_scope(self.axes.block)

    def on_step_begin(self, args, state, control, **kwargs):
        self.axes.begin_step(state.global_step + 1)

    def on_train_end(self, args, state, control, **kwargs):
        self.axes.finish()
