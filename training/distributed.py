"""The launch (how many processes, which one is this) and the distributed engine.

``talan-train RECIPE`` is one command for every setting: one process, ``torchrun
--nproc-per-node N`` and ``accelerate launch``. The launcher tells the processes apart by
the environment it sets; the recipe's ``distributed`` section chooses how they share the
run. Whatever cannot run here is refused by ``check`` before any model is loaded, with
what to install or change.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.recipe import DistributedConfig, Recipe

SHIPPED_CONFIGS = Path(__file__).resolve().parent / "distributed"
DEFAULT_CONFIG = {"fsdp": "fsdp.json", "deepspeed": "zero2.json"}
# accelerate launch's own choice of engine, from its config file or flags.
_ACCELERATE_ENGINE_FLAGS = {"ACCELERATE_USE_DEEPSPEED": "deepspeed", "ACCELERATE_USE_FSDP": "fsdp"}


class LaunchError(RuntimeError):
    """A recipe that cannot run under this launch or on this host, and what to change."""


@dataclass(frozen=True)
class Launch:
    """This process's place in the launch."""

    world_size: int
    rank: int
    local_rank: int
    launcher: str  # "python", "torchrun" or "accelerate"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Launch:
        env = os.environ if env is None else env
        launcher = "python"
        if any(key.startswith("ACCELERATE_") for key in env):
            launcher = "accelerate"
        elif "TORCHELASTIC_RUN_ID" in env:
            launcher = "torchrun"
        return cls(world_size=int(env.get("WORLD_SIZE", 1)), rank=int(env.get("RANK", 0)),
                   local_rank=int(env.get("LOCAL_RANK", 0)), launcher=launcher)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def engine_in_effect(distributed: DistributedConfig, launch: Launch) -> str:
    """What shares the work: ``none`` for DDP on one process, else the recipe's engine."""
    if distributed.engine == "ddp" and not launch.distributed:
        return "none"
    return distributed.engine


def engine_config_path(distributed: DistributedConfig) -> Path | None:
    if distributed.engine == "ddp":
        return None
    if distributed.config is not None:
        return Path(distributed.config)
    return SHIPPED_CONFIGS / DEFAULT_CONFIG[distributed.engine]


def engine_config(distributed: DistributedConfig) -> dict[str, Any] | None:
    """The engine's JSON config as a dict (None for DDP), read and checked for JSON."""
    path = engine_config_path(distributed)
    if path is None:
        return None
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise LaunchError(f"distributed.config: {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise LaunchError(f"distributed.config: {path} is not valid JSON: {err}") from None
    if not isinstance(record, dict):
        raise LaunchError(f"distributed.config: {path} must hold a JSON object")
    return record


def grad_accum_for(recipe: Recipe, launch: Launch, keep_effective_batch: bool) -> int:
    """``schedule.grad_accum`` for this launch; refuses a launch the recipe was not written
    for, unless asked to keep the recipe's effective batch by rescaling the accumulation."""
    schedule = recipe.schedule
    written_for = schedule.world_size
    if written_for is None or written_for == launch.world_size:
        return schedule.grad_accum
    effective = schedule.per_device_batch_size * schedule.grad_accum * written_for
    per_step = schedule.per_device_batch_size * launch.world_size
    rescaled = effective // per_step
    if not keep_effective_batch:
        hint = (f"add --keep-effective-batch to run grad_accum {rescaled} per process "
                f"(same effective batch)" if effective % per_step == 0 else
                f"no grad_accum keeps effective batch {effective} on {launch.world_size} "
                "processes; change schedule.world_size")
        raise LaunchError(
            f"{recipe.name} is written for {written_for} process(es) (effective batch "
            f"{effective} = {schedule.per_device_batch_size} x {schedule.grad_accum} x "
            f"{written_for}); this launch has {launch.world_size}. Launch it with "
            f"`torchrun --nproc-per-node {written_for} ...`, or {hint}")
    if effective % per_step:
        raise LaunchError(
            f"--keep-effective-batch: effective batch {effective} is not a multiple of "
            f"{schedule.per_device_batch_size} x {launch.world_size} processes")
    return rescaled


def check(recipe: Recipe, launch: Launch, cuda: bool) -> None:
    """Refuse, before the model loads, what this host or launch cannot run."""
    engine = recipe.distributed.engine
    for flag, chosen in _ACCELERATE_ENGINE_FLAGS.items():
        if str(os.environ.get(flag, "")).lower() == "true" and chosen != engine:
            raise LaunchError(
                f"accelerate launch is configured for {chosen}, the recipe's "
                f"distributed.engine is {engine}: the recipe decides; launch with a plain "
                "`accelerate launch --num-processes N` (no engine in its config)")
    if recipe.schedule.precision == "bf16" and not _has_bf16(cuda):
        raise LaunchError("schedule.precision is bf16 but this host has no CUDA device with "
                          "bf16; use precision 'auto' or 'fp32'")
    if engine == "fsdp":
        if not cuda:
            raise LaunchError(
                "distributed.engine fsdp needs CUDA devices: accelerate, which the Trainer "
                "runs on, applies FSDP only to multi-GPU launches, and on CPU processes would "
                "silently run DDP instead. On CPU use engine ddp (or deepspeed with "
                "DS_ACCELERATOR=cpu)")
        if not launch.distributed:
            raise LaunchError("distributed.engine fsdp shards over 2 or more processes; this "
                              "launch has 1 (use engine ddp, or torchrun --nproc-per-node N)")
    config = engine_config(recipe.distributed)
    if engine == "deepspeed":
        _check_deepspeed(recipe, cuda)
        _check_deepspeed_config(config, recipe)


def _has_bf16(cuda: bool) -> bool:
    import torch

    return cuda and torch.cuda.is_bf16_supported()


def _check_deepspeed(recipe: Recipe, cuda: bool) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise LaunchError("distributed.engine deepspeed needs DeepSpeed: "
                          "pip install 'talan-serve[deepspeed]' (deepspeed==0.19.8)")
    accelerator = os.environ.get("DS_ACCELERATOR")
    if not cuda and accelerator != "cpu":
        raise LaunchError(
            "DeepSpeed on a host without CUDA runs only on its CPU accelerator: set "
            "DS_ACCELERATOR=cpu (or run on a CUDA host)")
    if cuda and accelerator not in (None, "cuda"):
        raise LaunchError(f"DS_ACCELERATOR={accelerator} on a CUDA host: unset it")


def _check_deepspeed_config(config: dict[str, Any] | None, recipe: Recipe) -> None:
    """DeepSpeed's own parser over the config, with the Trainer's ``auto`` values filled.

    The Trainer owns the optimizer and the schedule (TALAN's axes live in the optimizer's
    step), so a config that brings its own is refused."""
    assert config is not None
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise LaunchError(
                f"{engine_config_path(recipe.distributed)}: remove its '{section}' section; "
                "the recipe's optim section sets the optimizer and schedule")
    stage = config.get("zero_optimization", {}).get("stage")
    if stage not in (0, 1, 2):
        raise LaunchError(
            f"{engine_config_path(recipe.distributed)}: zero_optimization.stage {stage!r} is "
            "not supported (0, 1 or 2: TALAN's block and the adapter are read whole by the "
            "connection point's hook, which stage 3's parameter sharding would break)")
    validate_deepspeed_config(config, recipe)


def validate_deepspeed_config(config: dict[str, Any], recipe: Recipe) -> dict[str, Any]:
    """The config as DeepSpeed's ``DeepSpeedConfig`` parses it (raises LaunchError).

    Before the process group exists DeepSpeed sees a world of one, so an ``auto``
    ``train_batch_size`` is left for it to derive; the Trainer fills in the real one."""
    from deepspeed.runtime.config import DeepSpeedConfig

    schedule = recipe.schedule
    filled = fill_auto(config, {
        "train_micro_batch_size_per_gpu": schedule.per_device_batch_size,
        "gradient_accumulation_steps": schedule.grad_accum,
        "gradient_clipping": recipe.optim.max_grad_norm or 0.0,
    })
    if filled.get("train_batch_size") == "auto":
        del filled["train_batch_size"]
    try:
        DeepSpeedConfig(filled)
    except Exception as err:  # DeepSpeed raises AssertionError/ValueError/pydantic errors
        raise LaunchError(f"DeepSpeed refuses {engine_config_path(recipe.distributed)}: "
                          f"{err}") from None
    return filled


def fill_auto(config: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with its top-level ``"auto"`` values replaced (as the Trainer
    does) and ``bf16``/``fp16`` sections resolved to off where they say ``auto``."""
    filled = json.loads(json.dumps(config))
    for key, value in values.items():
        if filled.get(key, "auto") == "auto":
            filled[key] = value
    for section in ("bf16", "fp16"):
        if isinstance(filled.get(section), dict) and filled[section].get("enabled") == "auto":
            filled[section]["enabled"] = False
    return filled


def close_process_group() -> None:
    """End a launch's process group once every process is done with it.

    A process that exits with its gloo group still open can abort at interpreter shutdown
    (``terminate called without an active exception``) while another rank is still writing
    the run's files; the barrier keeps every rank until the last one is done.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
