"""The prepared model folder: a TALAN checkpoint as a model folder an engine loads.

Every engine plugin loads this one format (docs/design.md, "The seam"). Layout::

    config.json                 the base config + architectures ["Talan<Host>"] + "talan": {...}
    <base files>                symlinks (tokenizer, generation config, weights)
    model*.safetensors          merged weights instead, when the adapter is merged
    talan/talan_model.safetensors   TALAN block weights (read by the plugin, not by the engine)
    talan/talan_config.json
    talan/lora/adapter_*        the PEFT adapter, when the engine serves it per request
    talan/prepared.json         what was done (checkpoint, base, merged or not)

``prepare_cached`` keeps one such folder per (checkpoint, base model, merge) under a cache
root, so a server that restarts does not merge the same weights again.

The architecture name selects the plugin's TALAN twin of the host class, and the
``talan`` section its config. A LoRA adapter is either served per request by the
engine's multi-LoRA support or merged into the base weights (``merge_lora=True``) so
that only TALAN stays live. DoRA adapters are always merged: the engines' LoRA paths do
not serve DoRA.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from talan_serve.adapter_spec import AdapterSetSpec
from talan_serve.checkpoint import ADAPTER_FILES, WEIGHTS_NAME, TalanCheckpoint, load_checkpoint
from talan_serve.config import CONFIG_NAME, TalanConfig
from talan_serve.hosts import HOSTS, talan_architecture

CONFIG_KEY = "talan"  # the TALAN section of a prepared folder's config.json
# A base model prepared for many adapters, loaded at run time, has this section instead.
ADAPTERS_KEY = "talan_adapters"
SIDE_DIR = "talan"  # where the TALAN side lives, out of reach of the engines' weight globs
LORA_DIR = "lora"
RECORD_NAME = "prepared.json"


def talan_weights_path(model_dir: str | Path) -> Path:
    return Path(model_dir) / SIDE_DIR / WEIGHTS_NAME


def _section(hf_config: Any, key: str) -> Any:
    return hf_config.get(key) if isinstance(hf_config, Mapping) else getattr(hf_config, key, None)


def checkpoint_config_of(hf_config: Any) -> TalanConfig | None:
    """The one checkpoint's TALAN config; None for a base prepared for many adapters.

    Raises unless the folder is one or the other."""
    record = _section(hf_config, CONFIG_KEY)
    if record is None:
        adapter_set_spec_of(hf_config)
        return None
    if isinstance(record, TalanConfig):
        return record
    return TalanConfig.from_dict(dict(record))


def adapter_set_spec_of(hf_config: Any) -> AdapterSetSpec:
    """What the engine sizes and wires for a prepared folder's TALAN adapters."""
    if _section(hf_config, CONFIG_KEY) is not None:
        return AdapterSetSpec.of_config(checkpoint_config_of(hf_config))
    record = _section(hf_config, ADAPTERS_KEY)
    if record is None:
        raise ValueError(
            "talan-serve: this model's config.json has no 'talan' section; build the "
            "model folder with talan_serve.prepared.prepare_model_dir (one checkpoint) or "
            "prepare_adapter_base (many)"
        )
    return record if isinstance(record, AdapterSetSpec) else AdapterSetSpec.from_dict(record)


def talan_model_config(
    host_record: dict[str, Any], config: TalanConfig | AdapterSetSpec
) -> dict[str, Any]:
    """The config.json of a TALAN model: the host's, renamed to its twin, plus ``talan``
    (one checkpoint) or ``talan_adapters`` (a base for adapters loaded at run time).

    Whether ``config`` fits the host's shape is the caller's check (a checkpoint's
    ``check_host``; the engine plugins check again when they build the model).
    """
    host = (host_record.get("architectures") or [None])[0]
    if host not in HOSTS:
        raise ValueError(
            f"talan-serve: base architecture {host!r} has no TALAN twin; supported: "
            f"{', '.join(HOSTS)}"
        )
    key = CONFIG_KEY if isinstance(config, TalanConfig) else ADAPTERS_KEY
    return {**host_record, "architectures": [talan_architecture(host)], key: config.to_dict()}


@dataclass(frozen=True)
class PreparedModel:
    """A loadable folder, and the adapter to serve per request (None when merged)."""

    path: Path
    lora_dir: Path | None
    lora_rank: int | None
    merged: bool
    has_talan: bool

    @classmethod
    def read(cls, path: str | Path) -> PreparedModel:
        """A folder written earlier by ``prepare_model_dir`` (wherever it was moved since)."""
        path = Path(path)
        record = json.loads((path / SIDE_DIR / RECORD_NAME).read_text())
        lora_dir = path / SIDE_DIR / LORA_DIR if record["lora_rank"] is not None else None
        return cls(path, lora_dir, record["lora_rank"], bool(record["merged_adapter"]),
                   bool(record["talan"]))


def adapter_config(adapter_dir: Path) -> dict[str, Any]:
    return json.loads((adapter_dir / ADAPTER_FILES[0]).read_text())


def lora_rank(adapter_dir: Path) -> int:
    record = adapter_config(adapter_dir)
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
    checkpoint: str | Path | TalanCheckpoint,
    out_dir: str | Path,
    base_model_dir: str | Path | None = None,
    merge_lora: bool = False,
) -> PreparedModel:
    """Write a loadable model folder for a checkpoint (see the module docstring).

    Args:
        checkpoint: a talan-serve checkpoint directory (TALAN and/or PEFT adapter), or
            one already loaded (and so validated) by ``load_checkpoint``.
        out_dir: the folder to (re)write; it is replaced.
        base_model_dir: the host model folder; default: the checkpoint's ``base_model``
            resolved by ``talan_serve.base_models.resolve_base_model``.
        merge_lora: merge the adapter into the base weights (DoRA: always).
    """
    from talan_serve.base_models import resolve_base_model

    if not isinstance(checkpoint, TalanCheckpoint):
        checkpoint = load_checkpoint(checkpoint)
    base = Path(base_model_dir or resolve_base_model(checkpoint.base_model))
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"talan-serve: {base} is not a local model folder")
    record = json.loads((base / "config.json").read_text())
    checkpoint.check_host(record.get("hidden_size"), record.get("num_hidden_layers"))
    if checkpoint.has_talan:
        record = talan_model_config(record, checkpoint.config)

    adapter = checkpoint.adapter_dir
    merge = adapter is not None and (merge_lora or bool(adapter_config(adapter).get("use_dora")))
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

    side = out / SIDE_DIR
    side.mkdir(exist_ok=True)
    if checkpoint.has_talan:
        shutil.copyfile(checkpoint.path / WEIGHTS_NAME, side / WEIGHTS_NAME)
        shutil.copyfile(checkpoint.path / CONFIG_NAME, side / CONFIG_NAME)
    (out / "config.json").write_text(json.dumps(record, indent=2) + "\n")

    lora_dir = None
    if adapter is not None and not merge:
        lora_dir = side / LORA_DIR
        lora_dir.mkdir()
        for name in ADAPTER_FILES:
            shutil.copyfile(adapter / name, lora_dir / name)

    prepared = PreparedModel(
        path=out,
        lora_dir=lora_dir,
        lora_rank=lora_rank(lora_dir) if lora_dir else None,
        merged=merge,
        has_talan=checkpoint.has_talan,
    )
    (side / RECORD_NAME).write_text(json.dumps({
        "checkpoint": str(checkpoint.path.resolve()),
        "base_model": str(base.resolve()),
        "merged_adapter": merge,
        "lora_rank": prepared.lora_rank,
        "talan": checkpoint.has_talan,
    }, indent=2) + "\n")
    return prepared


def _cache_key(checkpoint: TalanCheckpoint, base: Path, merge_lora: bool) -> str:
    """What a prepared folder depends on: the checkpoint's files (their recorded hashes),
    the base model's folder and weight files, and whether the adapter is merged."""
    digest = hashlib.sha256(json.dumps(checkpoint.manifest["files"], sort_keys=True).encode())
    digest.update(f"{base.resolve()}|merge={merge_lora}".encode())
    for item in sorted(base.iterdir()):
        if item.suffix in (".safetensors", ".json"):
            stat = item.stat()
            digest.update(f"|{item.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def prepare_cached(
    checkpoint: str | Path | TalanCheckpoint,
    cache_dir: str | Path,
    base_model_dir: str | Path | None = None,
    merge_lora: bool = False,
) -> PreparedModel:
    """``prepare_model_dir`` into ``cache_dir``, reusing a folder prepared earlier from the
    same checkpoint, base model and merge choice. The checkpoint is validated every time."""
    from talan_serve.base_models import resolve_base_model

    if not isinstance(checkpoint, TalanCheckpoint):
        checkpoint = load_checkpoint(checkpoint)
    base = Path(base_model_dir or resolve_base_model(checkpoint.base_model))
    out = Path(cache_dir) / _cache_key(checkpoint, base, merge_lora)
    if not (out / SIDE_DIR / RECORD_NAME).is_file():
        partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
        prepare_model_dir(checkpoint, partial, base_model_dir=base, merge_lora=merge_lora)
        try:
            # Rename last: a concurrent or interrupted preparation never leaves half a folder.
            partial.replace(out)
        except OSError:  # another process finished the same folder first
            shutil.rmtree(partial, ignore_errors=True)
    return PreparedModel.read(out)


def prepare_adapter_base(
    base_model_dir: str | Path, cache_dir: str | Path, spec: AdapterSetSpec
) -> Path:
    """A folder (under ``cache_dir``) that serves ``base_model_dir`` with room for TALAN
    adapters as ``spec`` sizes them; the adapters themselves are loaded at run time."""
    base = Path(base_model_dir)
    record = json.loads((base / "config.json").read_text())
    spec.check_host(record.get("hidden_size"), record.get("num_hidden_layers"))
    key = hashlib.sha256(json.dumps([str(base.resolve()), spec.to_dict()]).encode())
    out = Path(cache_dir) / f"adapters-{key.hexdigest()[:20]}"
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for item in sorted(base.iterdir()):
        if item.name != "config.json" and not item.name.startswith("."):
            os.symlink(item.resolve(), partial / item.name)
    (partial / "config.json").write_text(json.dumps(talan_model_config(record, spec),
                                                    indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    partial.replace(out)
    return out
