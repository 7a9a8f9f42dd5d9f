"""The ``--adapter-dir`` directory the contract suite serves: 10 adapters of 3 kinds, and
one folder for each way a checkpoint can be bad (each bad in that way only).

The 10 are the module's three checkpoints (three kinds: mixer, T, connection point, with
and without LoRA) and copies of them with other random weights
(``talan_serve.testing.reweight_checkpoint``: no base model to load, so they cost
milliseconds).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

PINNED = 2  # --adapters alpha beta
LIBRARY_PLACES = 3  # what --max-adapters leaves for the directory
KIND_SOURCES = ("alpha", "beta", "gamma")  # a{i} is a copy of KIND_SOURCES[i % 3]
LIBRARY = [f"a{i}" for i in range(10)]
STEPS = 4

# folder -> (HTTP status, error code, metric reason, what the message says)
REFUSED_FOLDERS = {
    "pickled": (400, "invalid_adapter", "checkpoint", "pickle files are refused"),
    "nan_talan": (400, "invalid_adapter", "checkpoint", "is not finite"),
    "nan_lora": (400, "invalid_adapter", "checkpoint", "is not finite"),
    "unknown_mixer": (400, "invalid_adapter", "checkpoint", "unknown network_type 'mamba'"),
    "wrong_shape": (400, "invalid_adapter", "checkpoint",
                    "summarize.slot_queries has shape (4, 128)"),
    "lora_off_base": (400, "invalid_adapter", "checkpoint",
                      "do not fit the base model's weight"),
    "talan_off_base": (400, "invalid_adapter", "checkpoint",
                       "does not fit the host model, whose hidden size is"),
    "too_many_slots": (400, "invalid_adapter", "unfit",
                       "n_themes 5 is above the 4 state slots"),
    "escape": (403, "adapter_path_not_allowed", "path", "a symlink that leads out of"),
    "inner_link": (403, "adapter_path_not_allowed", "path", "a symlink that leads out of"),
}
REFUSED_NAMES = {  # a request's model -> what the message says
    "a/b": "holds a path separator",
    "/".join(("..", "a0")): "holds a path separator",  # joined: the repo's own paths never climb
    "a..b": "holds '..'",
    ".hidden": "starts with '.'",
}
LISTED_REFUSED = set(REFUSED_FOLDERS) - {"escape"}  # a folder that leads out is not listed


def _edit_tensors(path: Path, file: str, edit) -> None:
    from safetensors.torch import load_file, save_file

    from talan_serve.testing import reseal_checkpoint

    tensors = load_file(str(path / file))
    edit(tensors)
    save_file(tensors, str(path / file))
    reseal_checkpoint(path)


def _nan(tensors: dict) -> None:
    tensors[sorted(tensors)[0]][0] = float("nan")


def _narrow(tensors: dict) -> None:
    tensors["summarize.slot_queries"] = torch.zeros(4, 128)


def _off_base(tensors: dict) -> None:
    key = next(k for k in sorted(tensors) if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], 96)


def build_hostile(directory: Path, source: Path, outside: Path) -> None:
    """``REFUSED_FOLDERS`` under ``directory``, from the good TALAN+LoRA ``source``;
    ``outside``: a checkpoint out of ``directory``."""
    from safetensors.torch import load_file, save_file

    from talan_serve.block import TalanBlock
    from talan_serve.checkpoint import ADAPTER_FILES, WEIGHTS_NAME
    from talan_serve.config import TalanConfig
    from talan_serve.testing import reseal_checkpoint

    def copy(name: str) -> Path:
        return Path(shutil.copytree(source, directory / name))

    pickled = copy("pickled")  # its weights as pickles only, the manifest unchanged
    for name in (WEIGHTS_NAME, ADAPTER_FILES[1]):
        torch.save(load_file(str(pickled / name)),
                   pickled / name.replace(".safetensors", ".bin"))
        (pickled / name).unlink()
    _edit_tensors(copy("nan_talan"), WEIGHTS_NAME, _nan)
    _edit_tensors(copy("nan_lora"), ADAPTER_FILES[1], _nan)
    mixer = copy("unknown_mixer")
    record = json.loads((mixer / "talan_config.json").read_text())
    (mixer / "talan_config.json").write_text(json.dumps({**record, "network_type": "mamba"}))
    reseal_checkpoint(mixer)
    _edit_tensors(copy("wrong_shape"), WEIGHTS_NAME, _narrow)
    _edit_tensors(copy("lora_off_base"), ADAPTER_FILES[1], _off_base)
    # Consistent in itself, with one slot more than the server's state holds.
    wide = copy("too_many_slots")
    config = TalanConfig.from_dict({**record, "n_themes": 5})
    config.save(wide)
    save_file(TalanBlock(config).state_dict(), str(wide / WEIGHTS_NAME))
    reseal_checkpoint(wide)
    # Consistent in itself, for a base model twice as wide as the server's.
    off_base = copy("talan_off_base")
    config = TalanConfig.from_dict({**record, "hidden_size": 2 * record["hidden_size"]})
    config.save(off_base)
    save_file(TalanBlock(config).state_dict(), str(off_base / WEIGHTS_NAME))
    reseal_checkpoint(off_base)
    os.symlink(outside, directory / "escape")  # a whole folder elsewhere
    inner = copy("inner_link")  # one file of it elsewhere
    (inner / WEIGHTS_NAME).unlink()
    os.symlink(outside / WEIGHTS_NAME, inner / WEIGHTS_NAME)


def build_library(directory: Path, sources: dict[str, Path], outside: Path) -> None:
    """``LIBRARY`` and the refused folders under ``directory``."""
    from talan_serve.testing import reweight_checkpoint

    directory.mkdir(parents=True)
    for index, name in enumerate(LIBRARY):
        reweight_checkpoint(sources[KIND_SOURCES[index % len(KIND_SOURCES)]],
                            directory / name, seed=100 + index)
    build_hostile(directory, sources["alpha"], outside)


def library_references(model_dir: Path, directory: Path, prompt: list[int]
                       ) -> dict[str, tuple[list[int], list[float]]]:
    """Each library adapter's greedy ids and logprobs by the transformers reference."""
    return {name: reference_of(model_dir, directory / name, prompt) for name in LIBRARY}


def reference_of(model_dir: Path, checkpoint: Path, prompt: list[int]
                 ) -> tuple[list[int], list[float]]:
    """One checkpoint's greedy ids and logprobs (``STEPS`` of them) by the reference."""
    from talan_serve.reference import load_reference
    from tests.contract.support import greedy

    return greedy(load_reference(model_dir, talan=checkpoint)[0], prompt, STEPS, talan=True)
