"""The run manifest: everything needed to audit or repeat a training run.

``training`` holds every training-side input (recipe fields, resolved schedule, data hash,
base model, adapter and TALAN configs): this is what ``talan-train audit`` compares.
``environment`` holds the software (package versions, git revision, device); ``results``
what came out (losses, timings). Only ``training`` must match within a pair.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

MANIFEST_NAME = "run_manifest.json"
PACKAGES = ("talan-serve", "torch", "transformers", "peft", "safetensors", "numpy",
            "accelerate", "tokenizers")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision(root: str | Path | None = None) -> dict[str, Any]:
    """HEAD commit and whether the working tree has uncommitted changes."""
    root = Path(root or Path(__file__).resolve().parent.parent)

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=20, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def base_model_record(model_dir: str | Path, name: str) -> dict[str, Any]:
    """The base model by name and by content (hash of its config and weight index)."""
    from talan_serve.checkpoint import sha256_file

    model_dir = Path(model_dir)
    record: dict[str, Any] = {"name": name}
    for file in ("config.json", "model.safetensors.index.json", "tokenizer.json"):
        if (model_dir / file).is_file():
            record[f"{file}_sha256"] = sha256_file(model_dir / file)
    return record


def device_record(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    record: dict[str, Any] = {"device": device.type, "compute_dtype": str(dtype).split(".")[-1],
                              "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(path)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no run manifest (is this a talan-train run?)") from None
