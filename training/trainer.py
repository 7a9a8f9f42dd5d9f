"""The recipe on transformers' ``Trainer`` (accelerate underneath): arguments and trainer.

``training_arguments`` maps a recipe onto ``TrainingArguments``: the recipe stays the
one source of truth, and nothing else sets a training knob. ``TalanTrainer`` changes only
what TALAN needs: the optimizer's groups and step hook (``axes``), and checkpoints in the
project's format (adapter + TALAN block + manifest, what ``talan-serve`` and
``load_reference`` take), both for the final model and inside every ``checkpoint-N``.

The loss is the model's own causal-LM loss given the step's total count of target
tokens (``num_items_in_batch``, counted over every micro-batch and every process): the
mean cross-entropy over all assistant tokens of the optimizer step, whatever the
accumulation and the number of processes (tests/training/test_trainer.py checks it
against the formula on the demo data).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer, TrainingArguments

from talan_serve.block import TalanBlock
from talan_serve.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from training.axes import TalanAxes
from training.data import SFTCollator
from training.distributed import Launch, engine_config, engine_config_path
from training.recipe import RECIPE_COPY, Recipe
from training.step_log import Hooks

logger = logging.getLogger(__name__)

REPORTERS = {"none": [], "tensorboard": ["tensorboard"], "wandb": ["wandb"]}


@dataclass(frozen=True)
class RunPlan:
    """What a launch resolved from the recipe before any model is loaded."""

    launch: Launch
    grad_accum: int            # per process
    device: torch.device
    compute_dtype: torch.dtype
    engine: str                # "none", "ddp", "fsdp" or "deepspeed"

    @property
    def cpu(self) -> bool:
        return self.device.type == "cpu"


def training_arguments(recipe: Recipe, plan: RunPlan) -> TrainingArguments:
    schedule, optim = recipe.schedule, recipe.optim
    engine = recipe.distributed.engine
    evaluates = schedule.eval_steps is not None
    return TrainingArguments(
        output_dir=recipe.output_dir,
        max_steps=schedule.max_steps,
        per_device_train_batch_size=schedule.per_device_batch_size,
        per_device_eval_batch_size=schedule.per_device_batch_size,
        gradient_accumulation_steps=plan.grad_accum,
        learning_rate=optim.lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1],
        adam_epsilon=optim.adam_eps,
        max_grad_norm=optim.max_grad_norm or 0.0,
        lr_scheduler_type=optim.scheduler,
        warmup_steps=recipe.warmup_steps,
        seed=recipe.seed,
        data_seed=recipe.data_seed,
        bf16=plan.compute_dtype == torch.bfloat16,
        # Checkpointing is set up with the model (training/model.py): the layer TALAN
        # hooks stays whole, which the Trainer's own switch would not do.
        gradient_checkpointing=False,
        logging_strategy="steps",
        logging_steps=schedule.log_every,
        save_strategy="steps" if schedule.save_steps else "no",
        save_steps=schedule.save_steps or 500,
        save_total_limit=schedule.save_total_limit,
        eval_strategy="steps" if evaluates else "no",
        eval_steps=schedule.eval_steps,
        report_to=REPORTERS[recipe.tracking.report_to],
        dataloader_drop_last=True,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        use_cpu=plan.cpu,
        ddp_backend="gloo" if plan.cpu and plan.launch.distributed else None,
        # The block is unused in frozen steps and its parameters stop requiring
        # gradients after activate_steps: DDP must not wait for their gradients.
        ddp_find_unused_parameters=plan.launch.distributed and recipe.talan is not None,
        fsdp=engine == "fsdp",
        fsdp_config=engine_config(recipe.distributed) if engine == "fsdp" else None,
        deepspeed=str(engine_config_path(recipe.distributed)) if engine == "deepspeed" else None,
        disable_tqdm=True,  # StepLogCallback draws the bar
        dataloader_num_workers=0,
    )


class TalanTrainer(Trainer):
    """``Trainer`` with TALAN's optimizer groups and the project's checkpoint format."""

    def __init__(self, *args: Any, recipe: Recipe, axes: TalanAxes, train_model: Any,
                 hooks: Hooks | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.recipe, self.axes, self.train_model = recipe, axes, train_model
        self.hooks = hooks or Hooks()

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            optim = self.recipe.optim
            groups = self.axes.param_groups(model if model is not None else self.model,
                                            optim.weight_decay)
            self.optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas),
                                               eps=optim.adam_eps)
            self.axes.attach(self.optimizer)
            for hook in self.hooks.before_update:
                self.optimizer.register_step_pre_hook(
                    lambda opt, args, kwargs, hook=hook: hook(self.state.global_step + 1,
                                                              self.train_model))
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The project's checkpoint (what ``talan-serve`` serves) plus the recipe."""
        if not self.args.should_save:
            return
        out = Path(output_dir or self.args.output_dir)
        peft_model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        save_checkpoint(out, self.recipe.base_model, block=self.axes.block,
                        peft_model=peft_model,
                        metadata={"run_manifest": "run_manifest.json",
                                  "recipe": self.recipe.name},
                        state_dict=state_dict)
        (out / RECIPE_COPY).write_text(self.recipe.to_yaml())

    def _load_from_checkpoint(self, resume_from_checkpoint: str,
                              model: torch.nn.Module | None = None) -> None:
        if self.is_fsdp_enabled:
            # FSDP restores its own sharded model state (written by the Trainer).
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        load_weights(Path(resume_from_checkpoint), self.accelerator.unwrap_model(self.model),
                     self.axes.block)


def load_weights(folder: Path, peft_model: nn.Module, block: TalanBlock | None) -> None:
    """The adapter's and the block's tensors from ``folder`` into the live model."""
    from peft import set_peft_model_state_dict

    checkpoint = load_checkpoint(folder)
    if checkpoint.has_talan != (block is not None):
        where = "in the checkpoint but not in the run" if checkpoint.has_talan else (
            "in the run but not in the checkpoint")
        raise CheckpointError(f"{folder}: TALAN {where}")
    if checkpoint.adapter_dir is not None:
        result = set_peft_model_state_dict(
            peft_model, load_file(str(folder / "adapter_model.safetensors")))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise CheckpointError(f"{folder}: adapter tensors the run lacks: {unexpected[:3]}")
    if block is not None:
        block.load_state_dict(checkpoint.state_dict, strict=True)


def make_trainer(recipe: Recipe, args: TrainingArguments, train_model: Any, train_set: list,
                 eval_set: list | None, axes: TalanAxes, callbacks: list,
                 hooks: Hooks | None) -> TalanTrainer:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer = TalanTrainer(
        model=train_model.model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=SFTCollator(train_model.tokenizer.pad_token_id),
        callbacks=callbacks,
        recipe=recipe, axes=axes, train_model=train_model, hooks=hooks,
    )
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    return trainer
