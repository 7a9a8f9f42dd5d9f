"""An adapter's files, validated whole before a server gives it a place.

``load_checkpoint`` checks what a checkpoint promises (manifest, checksums, config, the
TALAN tensors against the config). A server that serves checkpoints from folders it does
not write also needs them to be harmless and to fit its base model, so ``read_adapter``
adds, for every checkpoint a server loads (``--adapters``, ``--adapter-dir``,
``/v1/load_lora_adapter``):

* no pickle anywhere in the folder (only safetensors are read; nothing is unpickled);
* no file that resolves out of the folder it must stay in (a symlink out of DIR);
* every tensor finite, TALAN's and the LoRA's;
* the TALAN config fits the base (hidden size, connection point);
* the LoRA's tensors are A/B pairs of the rank its config gives, on linear weights the
  base model has, of their shapes (read from the base's safetensors headers, no tensor
  data).

What the server was sized for (state slots, kinds, LoRA rank) is checked by the server
(``server.adapters``). The result holds the weights files' bytes as they were checksummed
and validated, so that an engine loads exactly what was checked, and a host-memory cache
can reload it without the disk.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load
from torch import Tensor

from talan_serve.checkpoint import (
    ADAPTER_FILES,
    PICKLE_SUFFIXES,
    WEIGHTS_NAME,
    CheckpointError,
    check_finite,
    load_checkpoint,
)
from talan_serve.config import TalanConfig

# safetensors' names of the dtypes a weights file may hold.
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                 "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                 "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
# PEFT's key for one LoRA matrix of a module: base_model.model.<module>.lora_A.weight
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<half>[AB])\.weight$")
_HEADER_LIMIT = 100 * 2**20  # a safetensors header larger than this is not a model's


@dataclass(frozen=True)
class BaseWeights:
    """What a base model's files say about its shape: the residual width, the decoder
    layers and every weight's shape (from the safetensors headers alone)."""

    hidden_size: int
    num_layers: int
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def read(cls, model_dir: str | Path) -> BaseWeights:
        root = Path(model_dir)
        record = json.loads((root / "config.json").read_text())
        shapes: dict[str, tuple[int, ...]] = {}
        for file in sorted(root.glob("*.safetensors")):
            shapes.update(safetensors_shapes(file))
        return cls(int(record["hidden_size"]), int(record["num_hidden_layers"]), shapes)


def safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in a safetensors file, from its header (no tensor is read)."""
    with open(file, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        if size > _HEADER_LIMIT:
            raise CheckpointError(f"{file}: not a safetensors file (header of {size} bytes)")
        header = json.loads(handle.read(size))
    return {name: tuple(entry["shape"]) for name, entry in header.items()
            if name != "__metadata__"}


@dataclass(frozen=True)
class AdapterWeights:
    """One adapter's validated contents: its TALAN config and weights file (None: LoRA
    only), its LoRA's PEFT config and weights file (None: TALAN only) and the LoRA's rank.

    The weights are the safetensors bytes that were checksummed and validated, kept as
    they are: an engine receives exactly those bytes (``tensors_from_bytes`` decodes them
    in its processes), with no second read of the folder and no re-encoding."""

    path: Path
    base_model: str
    config: TalanConfig | None
    talan_file: bytes | None
    lora_config: dict[str, Any] | None
    lora_file: bytes | None
    lora_rank: int | None

    @property
    def has_talan(self) -> bool:
        return self.config is not None

    @property
    def has_lora(self) -> bool:
        return self.lora_file is not None

    @property
    def lora(self) -> dict[str, Tensor] | None:
        return None if self.lora_file is None else tensors_from_bytes(self.lora_file)

    @property
    def nbytes(self) -> int:
        """Host memory it takes (what a cache of adapters counts)."""
        return len(self.talan_file or b"") + len(self.lora_file or b"")


def refuse_pickles(root: Path) -> None:
    pickles = sorted(p.name for p in root.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{root}: {', '.join(pickles)}: pickle files are refused "
                              "(only safetensors are read; nothing is ever unpickled)")


def check_within(root: Path, within: Path) -> None:
    """Refuse a checkpoint folder, or a file in it, that resolves out of ``within``."""
    inside = Path(os.path.realpath(within))
    for path in (root, *sorted(root.iterdir())):
        resolved = Path(os.path.realpath(path))
        if resolved != inside and inside not in resolved.parents:
            raise PermissionError(f"{path.name if path != root else root}: a symlink that "
                                  f"leads out of {within} (to {resolved})")


def _lora_tensors(root: Path, data: bytes) -> dict[str, Tensor]:
    try:
        return load(data)
    except SafetensorError as error:
        raise CheckpointError(f"{root / ADAPTER_FILES[1]}: unreadable safetensors: "
                              f"{error}") from None


def check_lora(root: Path, config: dict[str, Any], tensors: dict[str, Tensor],
               base: BaseWeights, data: bytes | None = None) -> int:
    """Raise ``CheckpointError`` unless ``tensors`` are a LoRA of ``config`` on ``base``;
    the LoRA's rank. ``data``: the safetensors file they were read from, if at hand."""
    where = root / ADAPTER_FILES[1]
    if config.get("use_dora"):
        raise CheckpointError("DoRA adapters are served merged into the weights, one per "
                              "server: serve this checkpoint on its own")
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{root / ADAPTER_FILES[0]}: peft_type "
                              f"{config.get('peft_type')!r} is not a LoRA")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise CheckpointError(f"{root / ADAPTER_FILES[0]}: r must be an integer >= 1, "
                              f"got {rank!r}")
    patterned = bool(config.get("rank_pattern"))
    halves: dict[str, dict[str, Tensor]] = {}
    for name, tensor in tensors.items():
        match = _LORA_KEY.match(name)
        if match is None:
            raise CheckpointError(f"{where}: unexpected tensor {name} (a LoRA holds "
                                  "lora_A and lora_B weights only)")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{where}: tensor {name} is {tensor.dtype}, not floating")
        halves.setdefault(match["module"], {})[match["half"]] = tensor
    if not halves:
        raise CheckpointError(f"{where}: holds no LoRA tensor")
    check_finite(where, tensors, data)
    largest = 0
    for module, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"{where}: {module} has lora_{''.join(pair)} without "
                                  f"its lora_{'B' if 'A' in pair else 'A'}")
        target = base.shapes.get(f"{module}.weight")
        if target is None or len(target) != 2:
            raise CheckpointError(f"{where}: {module} is not a linear layer of the base "
                                  "model")
        out_features, in_features = target
        a, b = pair["A"], pair["B"]
        r = a.shape[0]
        if (a.dim(), b.dim()) != (2, 2) or tuple(a.shape) != (r, in_features) \
                or tuple(b.shape) != (out_features, r):
            raise CheckpointError(
                f"{where}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                f"do not fit the base model's weight {target} at rank {r} (need "
                f"({r}, {in_features}) and ({out_features}, {r}))")
        if r != rank and not patterned:
            raise CheckpointError(f"{where}: {module} has rank {r}, the config's r is "
                                  f"{rank}")
        largest = max(largest, r)
    return largest


def read_adapter(path: str | Path, base: BaseWeights,
                 within: Path | None = None) -> AdapterWeights:
    """Read and validate the checkpoint at ``path`` for a server on ``base`` (module
    docstring); ``within``: the folder its files must resolve into. Raises
    ``CheckpointError`` (or ``PermissionError`` for a path out of ``within``)."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory")
    if within is not None:
        check_within(root, within)
    refuse_pickles(root)
    contents: dict[str, bytes] = {}
    checkpoint = load_checkpoint(root, contents=contents)
    checkpoint.check_host(base.hidden_size, base.num_layers)
    lora_config = lora_file = rank = None
    if checkpoint.adapter_dir is not None:
        # load_checkpoint has checksummed both and read the config as a JSON object.
        lora_config = json.loads(contents[ADAPTER_FILES[0]])
        lora_file = contents[ADAPTER_FILES[1]]
        rank = check_lora(root, lora_config, _lora_tensors(root, lora_file), base,
                          lora_file)
    talan_file = contents[WEIGHTS_NAME] if checkpoint.has_talan else None
    return AdapterWeights(root, checkpoint.base_model, checkpoint.config, talan_file,
                          lora_config, lora_file, rank)


def tensors_from_bytes(data: bytes) -> dict[str, Tensor]:
    """A weights file's safetensors bytes, decoded (no pickle): how validated weights
    arrive in an engine's processes. A file of one dtype comes back as views of one
    buffer (one copy of the data), so that passed on to another process (SGLang's LoRA)
    its tensors travel as one block of shared memory rather than one each."""
    (size,) = struct.unpack_from("<Q", data)
    header = json.loads(bytes(data[8:8 + size]))
    header.pop("__metadata__", None)
    dtypes = {info["dtype"] for info in header.values()}
    dtype = _TORCH_DTYPES.get(dtypes.pop()) if len(dtypes) == 1 else None
    body = memoryview(data)[8 + size:]
    if dtype is None or not body.nbytes or body.nbytes % dtype.itemsize:
        return load(bytes(data))
    flat = torch.frombuffer(bytearray(body), dtype=dtype)
    # The data section holds the tensors back to back, in the order of their offsets.
    ordered = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    parts = flat.split([(end - start) // dtype.itemsize
                        for start, end in (info["data_offsets"] for _, info in ordered)])
    return {name: part.view(info["shape"])
            for (name, info), part in zip(ordered, parts, strict=True)}
