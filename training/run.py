"""One ``talan-train RECIPE.yaml`` run, end to end, in any launch.

recipe -> launch checks (before any model loads) -> data (generated if the recipe says so)
-> model (+adapter, +TALAN) -> transformers' Trainer -> checkpoint in the core format +
run manifest + JSONL log + loss PNG, all in ``output_dir``. A recipe without a ``talan``
section writes the LoRA-only twin (``talan_manifest.json`` says ``"talan": false``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from training import arithmetic
from training.axes import TalanAxes, TalanAxesCallback
from training.data import file_record, read_jsonl, tokenize_dataset
from training.distributed import Launch, check, engine_in_effect, grad_accum_for
from training.manifest import (
    MANIFEST_NAME,
    base_model_record,
    device_record,
    git_revision,
    package_versions,
    write_manifest,
)
from training.model import TrainModel, build, count_parameters, peft_config, resolve_precision
from training.plots import plot_loss, read_log
from training.recipe import RECIPE_COPY, Recipe
from training.step_log import (
    EVAL_LOG_NAME,
    LOG_NAME,
    Hooks,
    HooksCallback,
    StepLogCallback,
    StepRecord,
)
from training.trainer import RunPlan, make_trainer, training_arguments

logger = logging.getLogger(__name__)

PLOT_NAME = "loss.png"
# How the code applies the protocol; part of the audited training side (a code change
# that altered one of these would show up as a difference).
PROTOCOL = {
    "trainer": "transformers Trainer on accelerate; the recipe maps onto TrainingArguments",
    "matched_init": "torch.manual_seed(seed) right before get_peft_model; TALAN attached "
                    "after it on a forked RNG seeded with talan.init_seed (default: seed)",
    "grad_scale": "TALAN body grads x gamma after clipping, in a step pre-hook of the torch "
                  "optimizer (every engine calls it after its clipping)",
    "steps": "1-based optimizer steps; freeze_steps=k: identity in steps 1..k; "
             "activate_steps=k: TALAN updated in steps 1..k (other steps drop its grads "
             "before the update: no moment, step count or decay)",
    "loss": "mean cross-entropy over the assistant tokens of the whole optimizer step, on "
            "all processes (the model's causal-LM loss over num_items_in_batch)",
    "weight_decay": "all trainable params except biases and norms",
    "data_order": "accelerate's seedable sampler: torch.randperm per epoch seeded with "
                  "data_seed + epoch, each global batch split across processes; "
                  "incomplete last batch dropped",
    "scheduler": "linear warmup ceil(warmup_ratio*max_steps) steps, then cosine to 0",
}


@dataclass
class RunResult:
    output_dir: Path
    train_model: TrainModel
    records: list[StepRecord]
    manifest: dict[str, Any]


def prepare_data(recipe: Recipe) -> Path:
    path = Path(recipe.data.train_file)
    if not path.is_file():
        if recipe.data.generate is None:
            raise FileNotFoundError(f"data.train_file {path} does not exist (and the recipe "
                                    "names no generator)")
        held = arithmetic.write_splits(path, recipe.data.generate_train,
                                       recipe.data.generate_heldout, recipe.data.generate_seed)
        logger.info("generated %s and %s", path, held)
    if recipe.data.eval_file is not None and not Path(recipe.data.eval_file).is_file():
        raise FileNotFoundError(f"data.eval_file {recipe.data.eval_file} does not exist")
    return path


def plan_run(recipe: Recipe, keep_effective_batch: bool = False,
             launch: Launch | None = None) -> RunPlan:
    """Resolve the launch and refuse what cannot run here (LaunchError), loading nothing."""
    launch = launch or Launch.from_env()
    cuda = torch.cuda.is_available()
    check(recipe, launch, cuda)
    grad_accum = grad_accum_for(recipe, launch, keep_effective_batch)
    device = torch.device("cuda", launch.local_rank) if cuda else torch.device("cpu")
    dtype = resolve_precision(recipe.schedule.precision, device)
    return RunPlan(launch, grad_accum, device, dtype, engine_in_effect(recipe.distributed, launch))


def run(recipe: Recipe, hooks: Hooks | None = None, progress: bool = True,
        resume: bool = False, keep_effective_batch: bool = False) -> RunResult:
    started = time.perf_counter()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    plan = plan_run(recipe, keep_effective_batch)
    resume_from, resumed_at = None, 0
    if resume:
        from training.resume import newest

        resume_from, resumed_at = newest(recipe, plan.launch.world_size, plan.engine)
        logger.info("resuming from %s (step %d)", resume_from, resumed_at)
    # Constructing the arguments starts the process group: from here the main process
    # can go first where files are written once.
    out = Path(recipe.output_dir)
    if recipe.tracking.report_to == "wandb":
        # Offline always: the run is kept under output_dir for a later `wandb sync`.
        os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_DIR", str(out.resolve()))
        os.environ.setdefault("WANDB_PROJECT", "talan-serve")
    args = training_arguments(recipe, plan)
    with args.main_process_first(desc="training data"):
        out.mkdir(parents=True, exist_ok=True)
        data_path = prepare_data(recipe)

    if plan.engine == "deepspeed":
        from patches import apply_deepspeed

        apply_deepspeed()
    train_model = build(recipe, plan.device)
    examples, truncation = tokenize_dataset(train_model.tokenizer, read_jsonl(data_path),
                                            recipe.data.max_length)
    logger.info("%s: %s", data_path, truncation.summary())
    eval_examples = None
    if recipe.data.eval_file is not None and recipe.schedule.eval_steps is not None:
        eval_examples, _ = tokenize_dataset(train_model.tokenizer,
                                            read_jsonl(recipe.data.eval_file),
                                            recipe.data.max_length)
    counts = count_parameters(train_model.model, train_model.block)

    axes = TalanAxes(train_model.block)
    main = plan.launch.is_main
    step_log = StepLogCallback(out, axes, write=main, progress=progress, name=recipe.name,
                               resumed_at=resumed_at)
    callbacks: list = [TalanAxesCallback(axes), step_log]
    if hooks is not None:
        callbacks.append(HooksCallback(hooks, train_model))
    trainer = make_trainer(recipe, args, train_model, examples, eval_examples, axes,
                           callbacks, hooks)
    trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
    trainer.save_model(str(out))
    train_model.model.eval()

    manifest: dict[str, Any] = {}
    if main:
        logs = {recipe.name: out / LOG_NAME}
        plot_loss(logs, out / PLOT_NAME, title=f"{recipe.name} loss",
                  eval_logs={recipe.name: out / EVAL_LOG_NAME})
        manifest = _manifest(recipe, plan, train_model, data_path, examples, truncation,
                             counts, started, started_at, resumed_at, out)
        # What accelerate actually ran (it maps an engine it cannot apply to another).
        manifest["environment"]["accelerate_distributed_type"] = str(
            trainer.accelerator.distributed_type).split(".")[-1]
        write_manifest(out / MANIFEST_NAME, manifest)
    return RunResult(out, train_model, step_log.records, manifest)


def _manifest(recipe: Recipe, plan: RunPlan, train_model: TrainModel, data_path: Path,
              examples: list, truncation: Any, counts: dict[str, int], started: float,
              started_at: str, resumed_at: int, out: Path) -> dict[str, Any]:
    schedule, world = recipe.schedule, plan.launch.world_size
    log = read_log(out / LOG_NAME)  # the whole run's, a resumed one's included
    evals = read_log(out / EVAL_LOG_NAME) if (out / EVAL_LOG_NAME).is_file() else []
    train_seconds = sum(r["seconds"] for r in log)
    tokens = sum(r["tokens"] for r in log)
    return {
        "name": recipe.name,
        "training": {
            "recipe": recipe.to_dict(),
            "resolved": {
                "warmup_steps": recipe.warmup_steps,
                "world_size": world,
                "distributed_engine": plan.engine,
                "grad_accum_per_process": plan.grad_accum,
                "effective_batch": schedule.per_device_batch_size * plan.grad_accum * world,
                "compute_dtype": str(plan.compute_dtype).split(".")[-1],
                "gradient_checkpointing": schedule.gradient_checkpointing,
            },
            "protocol": PROTOCOL,
            "base_model": base_model_record(train_model.base_model_dir, recipe.base_model),
            "data": {**file_record(data_path), "examples": len(examples),
                     "truncation": truncation.to_dict()},
            "adapter": _jsonable(peft_config(recipe).to_dict()),
            "parameters": {"base_and_adapter": counts["total"] - counts["talan"],
                           "adapter_trainable": counts["adapter_trainable"]},
            "talan": None if train_model.talan_config is None else {
                "config": train_model.talan_config.to_dict(),
                "parameters": {"talan": counts["talan"],
                               "talan_trainable": counts["talan_trainable"]},
            },
        },
        "environment": {
            "packages": package_versions(),
            "git": git_revision(),
            "device": device_record(plan.device, plan.compute_dtype),
            "launcher": plan.launch.launcher,
        },
        "results": {
            "started_at": started_at,
            "resumed_from_step": resumed_at or None,
            "wall_seconds": round(time.perf_counter() - started, 1),
            "train_seconds": round(train_seconds, 1),
            "first_loss": log[0]["loss"],
            "final_loss": log[-1]["loss"],
            "mean_last5_loss": sum(r["loss"] for r in log[-5:]) / len(log[-5:]),
            "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
            "tokens": tokens,
            "tokens_per_second": tokens / max(train_seconds, 1e-9),
            "output_dir": str(out),
            "files": {"log": LOG_NAME, "loss_plot": PLOT_NAME, "recipe": RECIPE_COPY,
                      **({"eval_log": EVAL_LOG_NAME} if evals else {})},
        },
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_jsonable(v) for v in value]
        return sorted(items, key=str) if isinstance(value, set | frozenset) else items
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
