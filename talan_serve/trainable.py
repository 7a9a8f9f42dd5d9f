"""Which TALAN parameters train: the ``trainable`` scope (tau) and the gradient-scale groups.

Training-side only: serving never asks. ``gate`` is alpha and the writeback gate (what
``trainable="gate_only"`` trains and ``grad_scale`` leaves alone); ``body`` is the rest.
"""

from __future__ import annotations

from torch import nn

from talan_serve.block import TalanBlock
from talan_serve.config import TRAINABLE_SCOPES


def parameter_groups(block: TalanBlock) -> dict[str, list[nn.Parameter]]:
    """``gate``: alpha and the gate; ``body``: the rest (what grad_scale multiplies)."""
    gate = list(block.writeback.parameters())
    gate_ids = {id(p) for p in gate}
    body = [p for p in block.parameters() if id(p) not in gate_ids]
    return {"gate": gate, "body": body}


def apply_scope(block: TalanBlock, scope: str | None = None) -> None:
    """Set ``requires_grad`` by the config's (or the given) trainability scope."""
    scope = scope or block.config.trainable
    if scope not in TRAINABLE_SCOPES:
        raise ValueError(f"unknown trainable scope {scope!r}; expected one of {TRAINABLE_SCOPES}")
    groups = parameter_groups(block)
    for p in groups["gate"]:
        p.requires_grad_(scope in ("all", "gate_only"))
    for p in groups["body"]:
        p.requires_grad_(scope == "all")
