"""The SFT loop: AdamW + cosine warmup, grad accumulation, clipping, TALAN axes.

One optimizer step consumes ``grad_accum`` micro-batches of ``per_device_batch_size``
examples. The loss of a step is the mean token cross-entropy over all assistant tokens
of those micro-batches (each micro-batch's summed loss is divided by the step's total
target-token count), so accumulation does not change the objective.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.axes import TalanAxes
from training.data import IGNORE_INDEX, Batch, batches
from training.model import TrainModel
from training.recipe import Recipe

logger = logging.getLogger(__name__)

# Hooks for tests and analysis: called with (step, train_model) at fixed points.
StepHook = Callable[[int, TrainModel], None]


@dataclass
class Hooks:
    before_step: list[StepHook] = field(default_factory=list)   # before the forward passes
    before_update: list[StepHook] = field(default_factory=list)  # grads final, pre-optimizer
    after_step: list[StepHook] = field(default_factory=list)


@dataclass
class StepRecord:
    step: int
    loss: float
    lr: float
    grad_norm: float | None
    tokens: int
    target_tokens: int
    seconds: float
    tokens_per_second: float
    talan_active: bool
    talan_training: bool


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """HF's ``get_cosine_schedule_with_warmup`` factor for 0-based scheduler step ``step``."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and norm weights (HF Trainer's rule)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if "bias" in name or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": recipe.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.optim.lr, betas=tuple(recipe.optim.betas),
                             eps=recipe.optim.adam_eps)


def micro_batch_loss(train: TrainModel, batch: Batch, total_targets: int) -> torch.Tensor:
    device = train.device
    autocast = torch.autocast(device_type=device.type, dtype=train.compute_dtype,
                              enabled=train.compute_dtype != torch.float32)
    with autocast:
        logits = train.model(input_ids=batch.input_ids.to(device),
                             attention_mask=batch.attention_mask.to(device)).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = batch.labels[:, 1:].to(device)
    loss_sum = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                               shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    return loss_sum / max(1, total_targets)


def train(
    recipe: Recipe,
    train_model: TrainModel,
    examples: list,
    log_path: Path | None = None,
    hooks: Hooks | None = None,
    progress: bool = True,
) -> list[StepRecord]:
    hooks = hooks or Hooks()
    model, schedule = train_model.model, recipe.schedule
    axes = TalanAxes(train_model.block)
    optimizer = build_optimizer(recipe, model)
    total, warmup = schedule.max_steps, recipe.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, warmup, total))
    stream = batches(examples, schedule.per_device_batch_size, recipe.data_seed,
                     train_model.tokenizer.pad_token_id)
    # The training RNG (dropout) starts from the seed in both runs of a pair.
    torch.manual_seed(recipe.seed)
    model.train()

    records: list[StepRecord] = []
    log_file = open(log_path, "w") if log_path is not None else None  # noqa: SIM115
    bar = _progress_bar(total, recipe.name, progress)
    try:
        for step in range(1, total + 1):
            started = time.perf_counter()
            flags = axes.begin_step(step)
            for hook in hooks.before_step:
                hook(step, train_model)
            micro = [next(stream) for _ in range(schedule.grad_accum)]
            targets = sum(b.num_target_tokens for b in micro)
            optimizer.zero_grad(set_to_none=True)
            loss_value = 0.0
            for batch in micro:
                loss = micro_batch_loss(train_model, batch, targets)
                loss.backward()
                loss_value += float(loss.detach())
            grad_norm = None
            if recipe.optim.max_grad_norm is not None:
                params = [p for p in model.parameters() if p.grad is not None]
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params,
                                                                 recipe.optim.max_grad_norm))
            axes.scale_gradients()
            for hook in hooks.before_update:
                hook(step, train_model)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            seconds = time.perf_counter() - started
            tokens = sum(b.num_tokens for b in micro)
            record = StepRecord(step, loss_value, lr, grad_norm, tokens, targets, seconds,
                                tokens / seconds, flags["talan_active"], flags["talan_training"])
            records.append(record)
            if log_file is not None and (step % schedule.log_every == 0 or step == total):
                log_file.write(json.dumps(record.__dict__) + "\n")
                log_file.flush()
            for hook in hooks.after_step:
                hook(step, train_model)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens / seconds:.0f}",
                                lr=f"{lr:.2e}")
                bar.update(1)
            elif step % schedule.log_every == 0:
                logger.info("step %d/%d loss %.4f lr %.2e %.0f tok/s", step, total,
                            loss_value, lr, tokens / seconds)
    finally:
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()
    axes.finish()
    model.eval()
    return records


def _progress_bar(total: int, name: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=name, unit="step", dynamic_ncols=True)
