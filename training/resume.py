"""``talan-train RECIPE --resume``: find the newest full training checkpoint and vouch for it.

``schedule.save_steps`` makes the Trainer write ``output_dir/checkpoint-N`` every N steps:
the project's checkpoint (adapter, TALAN block, manifest with checksums) and the recipe,
plus the Trainer's optimizer, scheduler, per-process RNG states and ``trainer_state.json``
(the step, hence the data position: the seeded sampler's order is skipped up to it).
``trainer_state.json`` is written last, so a folder cut short by a crash lacks it: the
newest complete folder is the one to continue from. One that is corrupt, from another
recipe or from another number of processes is refused with the reason, before any model
is loaded.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from talan_serve.checkpoint import CheckpointError, load_checkpoint
from training.recipe import RECIPE_COPY, Recipe, RecipeError

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
# Not training inputs: a resumed run may rename itself or report elsewhere.
_FREE = ("name", "output_dir", "notes", "tracking")


class ResumeError(RuntimeError):
    """A checkpoint folder that a run cannot continue from, and why."""


def checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-N`` folders under ``output_dir``, oldest first."""
    root = Path(output_dir)
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir()
             and (m := CHECKPOINT_PATTERN.match(p.name))] if root.is_dir() else []
    return [p for _, p in sorted(found)]


def newest(recipe: Recipe, world_size: int, engine: str) -> tuple[Path, int]:
    """The newest complete checkpoint of ``recipe`` and its step, validated (raises
    ResumeError). Folders a crash cut short are passed over, and named in the log."""
    found = checkpoints(recipe.output_dir)
    complete = [p for p in found if (p / TRAINER_STATE).is_file()]
    if not complete:
        cut = f" ({', '.join(p.name for p in found)} incomplete)" if found else ""
        raise ResumeError(f"--resume: no complete checkpoint-N folder under "
                          f"{recipe.output_dir}{cut}; schedule.save_steps writes them")
    folder = complete[-1]
    for skipped in found[found.index(folder) + 1:]:
        logger.warning("%s: incomplete (no %s: the run stopped while writing it); "
                       "resuming from %s", skipped, TRAINER_STATE, folder.name)
    try:
        step = validate(folder, recipe, world_size, engine)
    except ResumeError as err:
        older = (f"; remove it to resume from {complete[-2].name}"
                 if len(complete) > 1 else "")
        raise ResumeError(f"{err}{older}") from None
    return folder, step


def validate(folder: Path, recipe: Recipe, world_size: int, engine: str) -> int:
    """The step ``folder`` continues from, if it can continue ``recipe``."""
    state_file = folder / TRAINER_STATE
    if not state_file.is_file():
        raise ResumeError(f"{folder}: incomplete checkpoint (no {TRAINER_STATE}; the run "
                          "stopped while writing it)")
    try:
        step = int(json.loads(state_file.read_text())["global_step"])
    except (ValueError, KeyError, TypeError) as err:
        raise ResumeError(f"{folder / TRAINER_STATE}: unreadable ({err})") from None
    if folder.name != f"checkpoint-{step}":
        raise ResumeError(f"{folder}: its {TRAINER_STATE} is at step {step}")
    try:
        saved = Recipe.load(folder / RECIPE_COPY)
    except RecipeError as err:
        raise ResumeError(f"{folder}: {err}") from None
    differences = recipe_differences(saved, recipe)
    if differences:
        raise ResumeError(f"{folder}: written by another recipe ({'; '.join(differences)})")
    try:
        load_checkpoint(folder)
    except CheckpointError as err:
        raise ResumeError(f"{folder}: {err}") from None
    _check_trainer_files(folder, world_size, engine)
    if step >= recipe.schedule.max_steps:
        raise ResumeError(f"{folder}: already at step {step} of {recipe.schedule.max_steps}")
    return step


def recipe_differences(saved: Recipe, current: Recipe) -> list[str]:
    from training.audit import flatten

    a, b = flatten(saved.to_dict()), flatten(current.to_dict())
    keys = sorted(k for k in set(a) | set(b) if k.split(".")[0] not in _FREE
                  and a.get(k) != b.get(k))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys]


def _check_trainer_files(folder: Path, world_size: int, engine: str) -> None:
    if engine == "deepspeed":
        if not any(p.is_dir() for p in folder.glob("global_step*")):
            raise ResumeError(f"{folder}: no DeepSpeed state (global_step*/); it was not "
                              "written by a DeepSpeed run")
    else:
        for name in ("optimizer.pt", "scheduler.pt"):
            if not (folder / name).is_file():
                raise ResumeError(f"{folder}: missing {name}")
    ranks = sorted(int(m.group(1)) for p in folder.glob("rng_state_*.pth")
                   if (m := re.match(r"rng_state_(\d+)\.pth$", p.name)))
    written = len(ranks) if ranks else 1 if (folder / "rng_state.pth").is_file() else 0
    if written == 0:
        raise ResumeError(f"{folder}: missing its RNG state (rng_state*.pth)")
    if written != world_size or (ranks and ranks != list(range(world_size))):
        raise ResumeError(f"{folder}: written by {written} process(es); this launch has "
                          f"{world_size} (the data position and RNG states are per process)")
