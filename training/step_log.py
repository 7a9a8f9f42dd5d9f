"""What a run reports per optimizer step: ``train_log.jsonl``, the progress bar, hooks.

One record per logged step (``schedule.log_every``; every step in the shipped recipes):
the step's loss (mean cross-entropy over every assistant token of the step, on all
processes), the learning rate the step used, the gradient norm before clipping, and the
tokens it read (all processes). Held-out losses go to ``eval_log.jsonl``. Only the main
process writes; every process keeps the records in memory.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from training.axes import TalanAxes

logger = logging.getLogger(__name__)

LOG_NAME = "train_log.jsonl"
EVAL_LOG_NAME = "eval_log.jsonl"


@dataclass
class StepRecord:
    step: int
    loss: float
    lr: float
    grad_norm: float | None
    tokens: int
    seconds: float
    tokens_per_second: float
    talan_active: bool
    talan_training: bool


# Hooks for tests and analysis: called with (step, train_model) at fixed points.
StepHook = Callable[[int, Any], None]


@dataclass
class Hooks:
    before_step: list[StepHook] = field(default_factory=list)   # before the forward passes
    before_update: list[StepHook] = field(default_factory=list)  # grads final, pre-optimizer
    after_step: list[StepHook] = field(default_factory=list)


class StepLogCallback(TrainerCallback):
    """Turns the Trainer's logs into ``StepRecord``s, the JSONL logs and the bar."""

    def __init__(self, out: Path, axes: TalanAxes, write: bool, progress: bool,
                 name: str, resumed_at: int = 0):
        self.out, self.axes, self.write = out, axes, write
        self.records: list[StepRecord] = []
        self.evals: list[dict[str, float]] = []
        self.progress, self.name, self.bar = progress, name, None
        self.resumed_at = resumed_at
        self._tokens_seen = 0
        self._started = time.perf_counter()
        if write:
            _keep_records_up_to(out / LOG_NAME, resumed_at)
            _keep_records_up_to(out / EVAL_LOG_NAME, resumed_at)

    def on_train_begin(self, args, state, control, **kwargs):
        self._tokens_seen = state.num_input_tokens_seen
        self._started = time.perf_counter()
        if self.progress and self.write:
            from tqdm import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.name,
                            unit="step", dynamic_ncols=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "eval_loss" in logs:
            record = {"step": state.global_step, "eval_loss": logs["eval_loss"]}
            self.evals.append(record)
            self._append(EVAL_LOG_NAME, record)
            logger.info("step %d held-out loss %.4f", state.global_step, logs["eval_loss"])
            return
        if "loss" not in logs:
            return
        now = time.perf_counter()
        seconds, self._started = now - self._started, now
        seen = int(logs.get("num_input_tokens_seen", state.num_input_tokens_seen))
        tokens, self._tokens_seen = seen - self._tokens_seen, seen
        flags = self.axes.flags
        grad_norm = logs.get("grad_norm")
        record = StepRecord(state.global_step, float(logs["loss"]), float(logs["learning_rate"]),
                            None if grad_norm is None else float(grad_norm), tokens, seconds,
                            tokens / max(seconds, 1e-9), flags.talan_active,
                            flags.talan_training)
        self.records.append(record)
        self._append(LOG_NAME, asdict(record))
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record.loss:.4f}",
                                 tok_s=f"{record.tokens_per_second:.0f}", lr=f"{record.lr:.2e}")
            self.bar.update(state.global_step - self.bar.n)
        elif self.write:
            logger.info("step %d/%d loss %.4f lr %.2e %.0f tok/s", state.global_step,
                        state.max_steps, record.loss, record.lr, record.tokens_per_second)

    def on_evaluate(self, args, state, control, **kwargs):
        self._started = time.perf_counter()  # held-out passes are not training time

    def on_save(self, args, state, control, **kwargs):
        self._started = time.perf_counter()  # nor are checkpoints

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()

    def _append(self, name: str, record: dict[str, Any]) -> None:
        if self.write:
            with open(self.out / name, "a") as handle:
                handle.write(json.dumps(record) + "\n")


class HooksCallback(TrainerCallback):
    """``Hooks``' before_step and after_step (before_update is an optimizer hook)."""

    def __init__(self, hooks: Hooks, train_model: Any):
        self.hooks, self.train_model = hooks, train_model

    def on_step_begin(self, args, state, control, **kwargs):
        for hook in self.hooks.before_step:
            hook(state.global_step + 1, self.train_model)

    def on_step_end(self, args, state, control, **kwargs):
        for hook in self.hooks.after_step:
            hook(state.global_step, self.train_model)


def _keep_records_up_to(path: Path, step: int) -> None:
    """A resumed run continues the log of the run it resumes: records past the checkpoint
    (written before the interruption) are dropped, since the resumed run redoes them."""
    if not path.is_file():
        return
    if step == 0:
        path.unlink()
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
