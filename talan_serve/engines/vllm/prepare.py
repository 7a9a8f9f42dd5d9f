"""Turn a talan-serve checkpoint into a folder vLLM loads as a TALAN model.

Layout written to ``out_dir``::

    config.json                 the base config + architectures ["Talan<Host>"] + "talan": {...}
    <base files>                symlinks (tokenizer, generation config, weights)
    model*.safetensors          merged weights instead, when the adapter is merged
    talan/talan_model.safetensors   TALAN block weights (read by the model, not vLLM's loader)
    talan/talan_config.json
    talan/lora/adapter_*        the PEFT adapter, when it is served through vLLM's LoRA
    talan/prepared.json         what was done (checkpoint, base, merged or not)

A LoRA adapter is either served per request (``LoRARequest``, mixed batches with and
without it) or merged into the base weights (``merge_lora=True``) so that only TALAN stays
live. DoRA adapters are always merged: vLLM's LoRA path does not serve DoRA.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from talan_serve.checkpoint import ADAPTER_FILES, load_checkpoint
from talan_serve.config import CONFIG_NAME
from talan_serve.engines.vllm import _compat
from talan_serve.engines.vllm.model import CONFIG_KEY, TALAN_SUBDIR, TALAN_WEIGHTS

PREPARED_NAME = "prepared.json"
LORA_SUBDIR = "lora"


@dataclass(frozen=True)
class PreparedModel:
    """A vLLM-loadable folder and the adapter to request per call (None when merged)."""

    path: Path
    lora_dir: Path | None
    lora_rank: int | None
    merged: bool
    has_talan: bool

    @property
    def max_lora_rank(self) -> int:
        """``LLM(max_lora_rank=...)``: vLLM accepts only a fixed set of ranks."""
        allowed = (8, 16, 32, 64, 128, 256, 320, 512)
        return next(r for r in allowed if r >= (self.lora_rank or 8))

    def lora_request(self, name: str = "talan-lora", lora_id: int = 1):
        """vLLM ``LoRARequest`` for the unmerged adapter (None if there is none)."""
        if self.lora_dir is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(name, lora_id, str(self.lora_dir))


def _is_dora(adapter_dir: Path) -> bool:
    record = json.loads((adapter_dir / ADAPTER_FILES[0]).read_text())
    return bool(record.get("use_dora"))


def _lora_rank(adapter_dir: Path) -> int:
    record = json.loads((adapter_dir / ADAPTER_FILES[0]).read_text())
    ranks = [record.get("r", 8), *(record.get("rank_pattern") or {}).values()]
    return int(max(ranks))


def _merge_into(base_dir: Path, adapter_dir: Path, out: Path) -> None:
    """Save base + adapter merged (PEFT's merge_and_unload) as plain HF weights."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(AutoConfig.from_pretrained(base_dir), "dtype", None) or torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)


def prepare_model_dir(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    base_model_dir: str | Path | None = None,
    merge_lora: bool = False,
) -> PreparedModel:
    """Write a vLLM model folder for ``checkpoint_dir`` (see the module docstring).

    Args:
        checkpoint_dir: a talan-serve checkpoint (TALAN and/or PEFT adapter).
        out_dir: the folder to (re)write; it is replaced.
        base_model_dir: the host model folder; default: the checkpoint's ``base_model``
            resolved by ``talan_serve.models.resolve_base_model``.
        merge_lora: merge the adapter into the base weights (DoRA: always).
    """
    from talan_serve.models import resolve_base_model

    checkpoint = load_checkpoint(checkpoint_dir)
    base = Path(base_model_dir or resolve_base_model(checkpoint.base_model))
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"talan-serve: {base} is not a local model folder")
    record = json.loads((base / "config.json").read_text())
    checkpoint.check_host(record.get("hidden_size"), record.get("num_hidden_layers"))
    host = (record.get("architectures") or [None])[0]
    if checkpoint.has_talan and host not in _compat.HOST_ARCHITECTURES:
        raise ValueError(
            f"talan-serve: base architecture {host!r} has no TALAN twin; supported: "
            f"{', '.join(_compat.HOST_ARCHITECTURES)}"
        )

    adapter = checkpoint.adapter_dir
    merge = adapter is not None and (merge_lora or _is_dora(adapter))
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    if merge:
        _merge_into(base, adapter, out)
    skip = {"config.json"}
    if merge:
        skip |= {p.name for p in out.iterdir()}
    for item in sorted(base.iterdir()):
        is_weights = item.suffix == ".safetensors" or item.name.endswith(".safetensors.index.json")
        if item.name in skip or (merge and is_weights) or item.name.startswith("."):
            continue
        os.symlink(item.resolve(), out / item.name)

    if checkpoint.has_talan:
        record["architectures"] = [_compat.talan_architecture(host)]
        record[CONFIG_KEY] = checkpoint.config.to_dict()
        side = out / TALAN_SUBDIR
        side.mkdir()
        shutil.copyfile(checkpoint.path / TALAN_WEIGHTS, side / TALAN_WEIGHTS)
        shutil.copyfile(checkpoint.path / CONFIG_NAME, side / CONFIG_NAME)
    (out / "config.json").write_text(json.dumps(record, indent=2) + "\n")

    lora_dir = None
    if adapter is not None and not merge:
        lora_dir = out / TALAN_SUBDIR / LORA_SUBDIR
        lora_dir.mkdir(parents=True)
        for name in ADAPTER_FILES:
            shutil.copyfile(adapter / name, lora_dir / name)

    prepared = PreparedModel(
        path=out,
        lora_dir=lora_dir,
        lora_rank=_lora_rank(lora_dir) if lora_dir else None,
        merged=merge,
        has_talan=checkpoint.has_talan,
    )
    (out / TALAN_SUBDIR).mkdir(exist_ok=True)
    (out / TALAN_SUBDIR / PREPARED_NAME).write_text(json.dumps({
        "checkpoint": str(checkpoint.path.resolve()),
        "base_model": str(base.resolve()),
        "merged_adapter": merge,
        "lora_dir": str(lora_dir) if lora_dir else None,
        "lora_rank": prepared.lora_rank,
        "talan": checkpoint.has_talan,
    }, indent=2) + "\n")
    return prepared
