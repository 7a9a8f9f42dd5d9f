"""One ``talan-train RECIPE.yaml`` run, end to end.

recipe -> data (generated if the recipe says so) -> model (+adapter, +TALAN) -> loop ->
checkpoint in the core format + run manifest + JSONL log + loss PNG, all in
``output_dir``. A recipe without a ``talan`` section writes the LoRA-only twin
(``talan_manifest.json`` says ``"talan": false``; no TALAN files).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from talan_serve.checkpoint import save_checkpoint
from training import arithmetic
from training.data import file_record, read_jsonl, tokenize_dataset
from training.loop import Hooks, StepRecord, train
from training.manifest import (
    MANIFEST_NAME,
    base_model_record,
    device_record,
    git_revision,
    package_versions,
    write_manifest,
)
from training.model import TrainModel, build, count_parameters, peft_config
from training.plots import plot_loss
from training.recipe import Recipe

logger = logging.getLogger(__name__)

LOG_NAME = "train_log.jsonl"
PLOT_NAME = "loss.png"
RECIPE_COPY = "recipe.yaml"
# How the code applies the protocol; part of the audited training side (a code change
# that altered one of these would show up as a difference).
PROTOCOL = {
    "matched_init": "torch.manual_seed(seed) right before get_peft_model; TALAN attached "
                    "after it on a forked RNG seeded with talan.init_seed (default: seed)",
    "grad_scale": "TALAN body grads x gamma after clipping, right before optimizer.step",
    "steps": "1-based optimizer steps; freeze_steps=k: identity in steps 1..k; "
             "activate_steps=k: TALAN updated in steps 1..k",
    "loss": "mean cross-entropy over assistant tokens of the whole optimizer step",
    "weight_decay": "all trainable params except biases and norms",
    "data_order": "torch.randperm per epoch from data_seed; incomplete last batch dropped",
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
    return path


def run(recipe: Recipe, hooks: Hooks | None = None, progress: bool = True,
        device: torch.device | None = None) -> RunResult:
    started = time.perf_counter()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_path = prepare_data(recipe)

    train_model = build(recipe, device)
    conversations = read_jsonl(data_path)
    examples, truncation = tokenize_dataset(train_model.tokenizer, conversations,
                                            recipe.data.max_length)
    logger.info("%s: %s", data_path, truncation.summary())
    counts = count_parameters(train_model.model, train_model.block)

    records = train(recipe, train_model, examples, out / LOG_NAME, hooks, progress)
    train_seconds = sum(r.seconds for r in records)

    save_checkpoint(out, recipe.base_model, block=train_model.block,
                    peft_model=train_model.model,
                    metadata={"run_manifest": MANIFEST_NAME, "recipe": recipe.name})
    (out / RECIPE_COPY).write_text(recipe.to_yaml())
    plot_loss({recipe.name: out / LOG_NAME}, out / PLOT_NAME, title=f"{recipe.name} loss")

    manifest = {
        "name": recipe.name,
        "training": {
            "recipe": recipe.to_dict(),
            "resolved": {
                "warmup_steps": recipe.warmup_steps,
                "effective_batch": recipe.schedule.per_device_batch_size
                * recipe.schedule.grad_accum,
                "compute_dtype": str(train_model.compute_dtype).split(".")[-1],
                "gradient_checkpointing": recipe.schedule.gradient_checkpointing,
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
            "device": device_record(train_model.device, train_model.compute_dtype),
        },
        "results": {
            "started_at": started_at,
            "wall_seconds": round(time.perf_counter() - started, 1),
            "train_seconds": round(train_seconds, 1),
            "first_loss": records[0].loss,
            "final_loss": records[-1].loss,
            "mean_last5_loss": sum(r.loss for r in records[-5:]) / len(records[-5:]),
            "tokens": sum(r.tokens for r in records),
            "tokens_per_second": sum(r.tokens for r in records) / max(train_seconds, 1e-9),
            "output_dir": str(out),
            "files": {"log": LOG_NAME, "loss_plot": PLOT_NAME, "recipe": RECIPE_COPY},
        },
    }
    write_manifest(out / MANIFEST_NAME, manifest)
    return RunResult(out, train_model, records, manifest)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_jsonable(v) for v in value]
        return sorted(items, key=str) if isinstance(value, set | frozenset) else items
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
