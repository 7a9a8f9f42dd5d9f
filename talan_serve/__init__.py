"""talan-serve: train and serve TALAN activation-level adapters."""

from talan_serve.block import TalanBlock, empty_state
from talan_serve.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from talan_serve.config import TalanConfig, TalanConfigError
from talan_serve.presets import PRESETS, preset
from talan_serve.reference import (
    attach_talan,
    detach_talan,
    find_talan,
    load_reference,
    talan_disabled,
)

__all__ = [
    "PRESETS",
    "CheckpointError",
    "TalanBlock",
    "TalanConfig",
    "TalanConfigError",
    "attach_talan",
    "detach_talan",
    "empty_state",
    "find_talan",
    "load_checkpoint",
    "load_reference",
    "preset",
    "save_checkpoint",
    "talan_disabled",
]
