"""Model names: what ``talan-serve --model``, ``load_reference`` and docker accept.

A name stands for a base model, a TALAN preset and a checkpoint directory found under
a checkpoint root (``--checkpoint-root``, ``$TALAN_SERVE_CHECKPOINT_ROOT``, or the
repository's ``checkpoints/``; a mounted volume in docker). The paper's names come from
``talan_serve.presets``; the demo pair on the offline default model is added here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from talan_serve.base_models import DEFAULT_BASE_MODEL, resolve_base_model
from talan_serve.checkpoint import is_checkpoint, read_manifest
from talan_serve.presets import PAPER_CONFIGS

REPO_CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
DEFAULT_MODEL = "smollm2-talan-demo"


class UnknownModelError(LookupError):
    """A model name that is neither in the registry nor a local path."""


class MissingCheckpointError(FileNotFoundError):
    """A known model name whose checkpoint has not been trained or mounted."""


@dataclass(frozen=True)
class ModelAlias:
    name: str
    base_model: str
    preset: str | None
    recipe: str
    description: str

    @property
    def checkpoint_subdir(self) -> str:
        return self.name


MODEL_ALIASES: dict[str, ModelAlias] = {
    alias.name: alias
    for alias in (
        ModelAlias("smollm2-talan-demo", DEFAULT_BASE_MODEL, None,
                   "training/recipes/smollm2-talan-demo.yaml",
                   "SmolLM2-135M-Instruct + demo TALAN+LoRA (offline default)"),
        ModelAlias("smollm2-lora-demo", DEFAULT_BASE_MODEL, None,
                   "training/recipes/smollm2-lora-demo.yaml",
                   "SmolLM2-135M-Instruct + the demo's matched LoRA-only twin"),
        *(ModelAlias(row.model_name, row.base_model, row.key, row.recipe,
                     f"{row.base_model.split('/')[-1]} + TALAN (paper, Table 1)")
          for row in PAPER_CONFIGS.values()),
    )
}


@dataclass(frozen=True)
class ResolvedModel:
    """What to load: the base model (local dir or hub id) and an optional checkpoint."""

    name: str
    base_model: Path | str
    checkpoint: Path | None


def checkpoint_root(override: str | Path | None = None) -> Path:
    if override is not None:
        return Path(override)
    return Path(os.environ.get("TALAN_SERVE_CHECKPOINT_ROOT", REPO_CHECKPOINTS))


def resolve_model(name_or_path: str | Path, root: str | Path | None = None) -> ResolvedModel:
    """Resolve a registry name, a checkpoint directory or a plain model directory."""
    text = str(name_or_path)
    alias = MODEL_ALIASES.get(text)
    if alias is not None:
        directory = checkpoint_root(root) / alias.checkpoint_subdir
        if not is_checkpoint(directory):
            raise MissingCheckpointError(
                f"model {text!r}: no checkpoint at {directory}. Make it with:\n"
                f"  talan-train {alias.recipe} --output {directory}\n"
                "or point --checkpoint-root (TALAN_SERVE_CHECKPOINT_ROOT) at a folder holding it"
            )
        return ResolvedModel(text, resolve_base_model(alias.base_model), directory)
    path = Path(text)
    if is_checkpoint(path):
        base = read_manifest(path)["base_model"]
        return ResolvedModel(text, resolve_base_model(base), path)
    if path.is_dir() and (path / "config.json").is_file():
        return ResolvedModel(text, path, None)
    if text == DEFAULT_BASE_MODEL:
        return ResolvedModel(text, resolve_base_model(text), None)
    known = ", ".join(MODEL_ALIASES)
    raise UnknownModelError(
        f"unknown model {text!r}: not a registered name ({known}), "
        "a checkpoint directory, or a local HF model directory"
    )
