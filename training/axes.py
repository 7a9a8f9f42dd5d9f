"""TALAN's training-time axes, applied around each optimizer step.

Steps are counted from 1 (the first optimizer update is step 1), so with ``k`` steps:
- ``freeze_steps=k``: the block is the identity (its placement's off switch) during the
  forward/backward passes of steps 1..k; it acts from step k+1 on.
- ``activate_steps=k``: TALAN parameters are updated by steps 1..k only (the paper's
  Q8B record: "trainable for steps 0-19, frozen for steps 20-77", 0-indexed).
- ``trainable`` (tau): which parameters ever get gradients (``trainable.apply_scope``).
- ``grad_scale`` (gamma): multiplies the gradients of the block's ``body`` group (not the
  gate/alpha) after gradient clipping, right before ``optimizer.step()`` -- where an HF
  Trainer ``on_pre_optimizer_step`` callback, the paper's mechanism, sees them. Clipping
  first keeps the adapter's clip factor from being dominated by a 500x-1000x boost.
"""

from __future__ import annotations

from dataclasses import dataclass

from talan_serve.block import TalanBlock
from talan_serve.trainable import apply_scope, parameter_groups


@dataclass
class TalanAxes:
    block: TalanBlock | None

    def begin_step(self, step: int) -> dict[str, bool]:
        """Set the block's switch and trainability for optimizer step ``step`` (1-based)."""
        if self.block is None:
            return {"talan_active": False, "talan_training": False}
        config = self.block.config
        active = step > config.freeze_steps
        self.block.placement.enabled = active
        training = config.activate_steps is None or step <= config.activate_steps
        apply_scope(self.block, config.trainable if training else "frozen")
        updates = active and training and config.trainable != "frozen"
        return {"talan_active": active, "talan_training": updates}

    def scale_gradients(self) -> None:
        """Multiply the body gradients by gamma (call after clipping, before the step)."""
        if self.block is None or self.block.config.grad_scale == 1.0:
            return
        for param in parameter_groups(self.block)["body"]:
            if param.grad is not None:
                param.grad.mul_(self.block.config.grad_scale)

    def finish(self) -> None:
        """After training: the block acts (the checkpoint is served with TALAN on)."""
        if self.block is not None:
            self.block.placement.enabled = True
            apply_scope(self.block)
