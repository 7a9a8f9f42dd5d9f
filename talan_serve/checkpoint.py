"""The TALAN checkpoint directory: write it, and refuse to load a broken one.

Layout (docs/design.md, "Checkpoints")::

    talan_config.json          TalanConfig            (absent in a LoRA-only twin)
    talan_model.safetensors    TalanBlock tensors     (absent in a LoRA-only twin)
    adapter_config.json        PEFT adapter, as PEFT's save_pretrained writes it
    adapter_model.safetensors
    talan_manifest.json        base model + sha256 of every file above
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from torch import Tensor, nn

from talan_serve.block import TalanBlock
from talan_serve.config import CONFIG_NAME, TalanConfig, TalanConfigError

WEIGHTS_NAME = "talan_model.safetensors"
MANIFEST_NAME = "talan_manifest.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
FORMAT = "talan-checkpoint"
FORMAT_VERSION = 1
# Weight formats that are Python pickles: never read (loading one can run any code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint directory that does not hold what its manifest and config promise."""


@dataclass
class TalanCheckpoint:
    """What a checkpoint directory holds, validated."""

    path: Path
    base_model: str
    config: TalanConfig | None
    state_dict: dict[str, Tensor] | None
    adapter_dir: Path | None
    manifest: dict[str, Any]

    @property
    def has_talan(self) -> bool:
        return self.config is not None

    def check_host(self, hidden_size: int, num_layers: int) -> None:
        """Raise ``CheckpointError`` if the TALAN config does not fit that host."""
        if self.config is None:
            return
        try:
            self.config.check_host(hidden_size, num_layers)
        except TalanConfigError as err:
            raise CheckpointError(f"{self.path}: {err}") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(
    out_dir: str | Path,
    base_model: str,
    block: TalanBlock | None = None,
    peft_model: nn.Module | None = None,
    metadata: dict[str, Any] | None = None,
    state_dict: dict[str, Tensor] | None = None,
) -> Path:
    """Write a checkpoint: TALAN block (if any), PEFT adapter (if any), manifest.

    ``base_model`` is what a loader should load underneath: a registry name, a hub id
    (resolved on a host that has it) or a path. ``state_dict``: the whole model's tensors
    as a training engine gathered them (sharded or wrapped parameters are not whole
    tensors of the live modules); the block's and the adapter's are taken from it.
    """
    if block is None and peft_model is None:
        raise ValueError("save_checkpoint: nothing to save (no TALAN block, no adapter)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    if block is not None:
        block.config.save(out)
        source = block.state_dict() if state_dict is None else _block_tensors(
            state_dict, block, peft_model)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous()
                   for k, v in source.items()}
        save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        (out / WEIGHTS_NAME).chmod(0o644)  # safetensors creates it owner-only
        files += [CONFIG_NAME, WEIGHTS_NAME]
    if peft_model is not None:
        with tempfile.TemporaryDirectory() as tmp:
            peft_model.save_pretrained(tmp, state_dict=state_dict)
            for name in ADAPTER_FILES:
                shutil.copyfile(Path(tmp) / name, out / name)
        # PEFT records the base model's local path (a cache dir on this machine); the
        # manifest's portable name is what a loader elsewhere can resolve.
        adapter_config = json.loads((out / ADAPTER_FILES[0]).read_text())
        adapter_config["base_model_name_or_path"] = str(base_model)
        (out / ADAPTER_FILES[0]).write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
        files += list(ADAPTER_FILES)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": str(base_model),
        "talan": block is not None,
        "adapter": peft_model is not None,
        "files": {name: sha256_file(out / name) for name in files},
        **({"metadata": metadata} if metadata else {}),
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def _block_tensors(state_dict: dict[str, Tensor], block: TalanBlock,
                   model: nn.Module | None) -> dict[str, Tensor]:
    """The block's tensors out of its host's whole state dict."""
    prefix = next((name for name, module in (model.named_modules() if model else [])
                   if module is block), None)
    if prefix is None:
        raise ValueError("save_checkpoint: the block is not a submodule of the given model")
    tensors = {}
    for key in block.state_dict():
        for candidate in (f"{prefix}.{key}", f"module.{prefix}.{key}"):
            if candidate in state_dict:
                tensors[key] = state_dict[candidate]
                break
        else:
            raise ValueError(f"save_checkpoint: the state dict has no {prefix}.{key}")
    return tensors


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: missing {path.name} ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable JSON ({what}): {err}") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: expected a JSON object ({what})")
    return record


def _check_tensors(path: Path, config: TalanConfig, tensors: dict[str, Tensor],
                   data: bytes | None = None) -> None:
    with torch.device("meta"):  # shapes only: no memory, no random init
        expected = TalanBlock(config).state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{path}: missing TALAN tensor(s): {', '.join(missing)}")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected TALAN tensor(s): {', '.join(unexpected)}")
    for name, want in expected.items():
        got = tensors[name]
        if got.shape != want.shape:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(got.shape)}, the config "
                f"({config.network_type}, hidden_size={config.hidden_size}, "
                f"mixer_dim={config.mixer_dim}, n_themes={config.n_themes}) "
                f"needs {tuple(want.shape)}"
            )
        if got.dtype != torch.float32:
            raise CheckpointError(f"{path}: tensor {name} is {got.dtype}, expected torch.float32")
    check_finite(path, tensors, data)


def check_finite(path: Path, tensors: dict[str, Tensor], data: bytes | None = None) -> None:
    """Refuse a tensor holding NaN or infinity: it would poison every request it touches.

    A NaN or an infinity makes a sum NaN or infinite, so a finite sum clears every value
    in it; only a non-finite sum, which may also be an overflow of finite values, looks
    at every element. ``data``: the safetensors file ``tensors`` were read from, whose
    data section (every tensor, back to back) is then summed at once when they share a
    dtype numpy has (a LoRA is hundreds of small tensors: one sum each costs more)."""
    if data is not None and _data_section_finite(data, tensors):
        return
    sums = [tensor.sum(dtype=torch.float64) for tensor in tensors.values()]
    if not sums or bool(torch.isfinite(torch.stack(sums)).all()):
        return
    for name, tensor in tensors.items():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise CheckpointError(f"{path}: tensor {name} is not finite ({bad} NaN or "
                                  f"infinite value{'s' if bad > 1 else ''} of "
                                  f"{tensor.numel()})")


_NUMPY_FLOATS = {torch.float32: np.float32, torch.float16: np.float16,
                 torch.float64: np.float64}


def _data_section_finite(data: bytes, tensors: dict[str, Tensor]) -> bool:
    """True if the data section of the safetensors file ``data`` sums to a finite value
    (so every tensor in it is finite); False if it does not or cannot be summed so."""
    dtypes = {tensor.dtype for tensor in tensors.values()}
    dtype = _NUMPY_FLOATS.get(dtypes.pop()) if len(dtypes) == 1 else None
    if dtype is None or len(data) < 8:
        return False
    start = 8 + int.from_bytes(data[:8], "little")
    if start > len(data) or (len(data) - start) % np.dtype(dtype).itemsize:
        return False
    values = np.frombuffer(data, dtype=dtype, offset=start)
    with np.errstate(over="ignore", invalid="ignore"):  # the answer is the sum's finiteness
        return bool(np.isfinite(values.sum(dtype=np.float64)))


def read_manifest(path: str | Path) -> dict[str, Any]:
    """A checkpoint's manifest (base model, what it holds), checked for format only.

    Cheap: hashes nothing and loads no tensors. ``load_checkpoint`` validates the rest.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory")
    manifest = _read_json(root / MANIFEST_NAME, "checkpoint manifest")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{root / MANIFEST_NAME}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{root / MANIFEST_NAME}: format_version {manifest.get('format_version')!r} "
            f"is not supported (this talan-serve reads {FORMAT_VERSION})"
        )
    if not isinstance(manifest.get("files"), dict) or not isinstance(
        manifest.get("base_model"), str
    ):
        raise CheckpointError(f"{root / MANIFEST_NAME}: needs 'files' and 'base_model'")
    return manifest


def load_checkpoint(
    path: str | Path,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    contents: dict[str, bytes] | None = None,
) -> TalanCheckpoint:
    """Read and validate a checkpoint directory.

    With ``hidden_size``/``num_layers`` of the intended host, also refuses a config that
    does not fit it. Every failure raises ``CheckpointError`` naming the problem. Each file
    is read once: its checksum and its tensors come from the same bytes, which
    ``contents``, if given, receives (file name -> bytes).
    """
    root = Path(path)
    manifest = read_manifest(root)
    listed = manifest["files"]
    read = contents if contents is not None else {}
    required = ([CONFIG_NAME, WEIGHTS_NAME] if manifest.get("talan") else []) + (
        list(ADAPTER_FILES) if manifest.get("adapter") else [])
    for name in required:
        if name not in listed:
            raise CheckpointError(f"{root / MANIFEST_NAME}: does not list {name}")
    for name, digest in listed.items():
        file = root / name
        if not file.is_file():
            pickled = [p.name for p in root.glob(f"{Path(name).stem}.*")
                       if p.suffix in PICKLE_SUFFIXES]
            if pickled:
                raise CheckpointError(
                    f"{root}: missing file {name}; {', '.join(sorted(pickled))} is a pickle, "
                    "and talan-serve reads only safetensors (it never unpickles)")
            raise CheckpointError(f"{root}: missing file {name} (listed in the manifest)")
        data = file.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise CheckpointError(
                f"{file}: checksum mismatch (manifest sha256 {digest[:12]}..., "
                f"file {actual[:12]}...); the file changed after the checkpoint was written"
            )
        read[name] = data

    config, state_dict = None, None
    if manifest.get("talan"):
        try:
            config = TalanConfig.load(root / CONFIG_NAME)
        except TalanConfigError as err:
            raise CheckpointError(f"{root / CONFIG_NAME}: {err}") from None
        try:
            state_dict = load(read[WEIGHTS_NAME])
        except SafetensorError as err:
            raise CheckpointError(f"{root / WEIGHTS_NAME}: unreadable safetensors: {err}") from None
        _check_tensors(root / WEIGHTS_NAME, config, state_dict, read[WEIGHTS_NAME])
    if manifest.get("adapter"):
        _read_json(root / ADAPTER_FILES[0], "PEFT adapter config")
    checkpoint = TalanCheckpoint(
        path=root,
        base_model=manifest["base_model"],
        config=config,
        state_dict=state_dict,
        adapter_dir=root if manifest.get("adapter") else None,
        manifest=manifest,
    )
    if hidden_size is not None and num_layers is not None:
        checkpoint.check_host(hidden_size, num_layers)
    return checkpoint


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()
