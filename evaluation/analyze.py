"""What TALAN does inside the model: per-layer divergence, perturbation scale and
orthogonality at the insertion point, and the drift audit of its tensors.

Residual-stream points: ``emb`` is the stream entering decoder layer 0 (after TALAN when
it sits at the embedding), ``L<k>`` the stream leaving decoder layer k (after TALAN when
it sits at ``layer_k``). One forward per prompt, no generation, fp32.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from talan_serve.block import TalanBlock
from talan_serve.config import TalanConfig
from talan_serve.reference import _decoder, find_talan, talan_disabled
from talan_serve.trainable import apply_scope

FRESH_SEED = 0
FRESH_DISTANCE = math.sqrt(2)  # two independent draws of one zero-mean distribution
FRESH_BAND = 0.15  # |rel_dist - sqrt(2)| within this: indistinguishable from a fresh draw
DRIFT_FLOOR = 1e-4  # a deterministic tensor this far from its init formula has moved


def point_names(num_layers: int) -> list[str]:
    return ["emb"] + [f"L{k}" for k in range(num_layers)]


def insertion_point(config: TalanConfig) -> str:
    return "emb" if config.layer_index is None else f"L{config.layer_index}"


@contextlib.contextmanager
def residual_streams(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside, each forward appends its streams (one (tokens, d) tensor per point)."""
    decoder = _decoder(model)
    captured: list[torch.Tensor] = []

    def entering(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.append(hidden[0].detach().float().clone())

    def leaving(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        captured.append(hidden[0].detach().float().clone())

    # Registered after TALAN's own hooks, so they see the stream TALAN wrote.
    handles = [decoder.layers[0].register_forward_pre_hook(entering, with_kwargs=True)]
    handles += [layer.register_forward_hook(leaving) for layer in decoder.layers]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def streams_of(model: nn.Module, prompt: list[int]) -> list[torch.Tensor]:
    with residual_streams(model) as captured:
        model(input_ids=torch.tensor([prompt]))
    return list(captured)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: b is the baseline side."""
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


@dataclass
class Divergence:
    """Per point, one value per prompt: rel_diff (side vs baseline) and mean token cosine."""

    label: str
    points: list[str]
    rel_diff: list[list[float]] = field(default_factory=list)  # [prompt][point]
    cosine: list[list[float]] = field(default_factory=list)

    def add(self, side: list[torch.Tensor], baseline: list[torch.Tensor]) -> None:
        self.rel_diff.append([rel_diff(a, b) for a, b in zip(side, baseline, strict=True)])
        self.cosine.append([token_cosine(a, b) for a, b in zip(side, baseline, strict=True)])

    def mean(self, values: list[list[float]]) -> list[float]:
        return [sum(column) / len(column) for column in zip(*values, strict=True)]

    def summary(self) -> dict[str, Any]:
        return {"label": self.label, "points": self.points,
                "rel_diff_mean": self.mean(self.rel_diff), "cosine_mean": self.mean(self.cosine),
                "rel_diff": self.rel_diff, "cosine": self.cosine}


@torch.no_grad()
def divergences(model: nn.Module, prompts: list[list[int]],
                twin: nn.Module | None = None) -> list[Divergence]:
    """TALAN hooks on vs off (same model), and TALAN+LoRA vs its LoRA-only twin."""
    points = point_names(len(_decoder(model).layers))
    hooks = Divergence("TALAN hooks on vs off", points)
    vs_twin = Divergence("TALAN+LoRA vs LoRA-only twin", points) if twin is not None else None
    for prompt in prompts:
        on = streams_of(model, prompt)
        with talan_disabled(model):
            off = streams_of(model, prompt)
        hooks.add(on, off)
        if vs_twin is not None:
            vs_twin.add(on, streams_of(twin, prompt))
    return [hooks] + ([vs_twin] if vs_twin is not None else [])


@torch.no_grad()
def scale_and_orthogonality(model: nn.Module, prompts: list[list[int]]) -> dict[str, Any]:
    """At the insertion point: ||dLoRA|| / ||dTALAN|| over every token, and the per-token
    cosine between the two updates. dTALAN = stream with TALAN - without (LoRA on both
    sides); dLoRA = stream with LoRA - without (TALAN off on both sides). LoRA adapts
    the decoder layers' weights, so it has not acted yet on the stream entering layer 0:
    for TALAN at the embedding, dLoRA is taken where it first acts, leaving layer 0."""
    block = find_talan(model)
    if block is None or not hasattr(model, "disable_adapter"):
        raise ValueError("the checkpoint needs both TALAN and a LoRA adapter")
    names = point_names(len(_decoder(model).layers))
    index = names.index(insertion_point(block.config))
    lora_index = max(index, 1)
    d_talan, d_lora = [], []
    for prompt in prompts:
        on = streams_of(model, prompt)
        with talan_disabled(model):
            lora = streams_of(model, prompt)
            with model.disable_adapter():
                base = streams_of(model, prompt)
        d_talan.append(on[index] - lora[index])
        d_lora.append(lora[lora_index] - base[lora_index])
    talan, lora = torch.cat(d_talan), torch.cat(d_lora)
    cosine = torch.nn.functional.cosine_similarity(lora, talan, dim=-1)
    return {"point": insertion_point(block.config), "lora_point": names[lora_index],
            "tokens": int(talan.shape[0]),
            "norm_ratio_lora_over_talan": float(lora.norm() / talan.norm().clamp_min(1e-30)),
            "cosine_mean": float(cosine.mean()), "cosine_std": float(cosine.std())}


def fresh_block(config: TalanConfig, seed: int) -> TalanBlock:
    torch.manual_seed(seed)
    block = TalanBlock(config)
    apply_scope(block)
    return block


def drift_audit(config: TalanConfig, saved: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Each saved tensor against a fresh block from the same config (seed 0).

    rel_dist = ||saved - fresh|| / max(||saved||, ||fresh||). A tensor whose init is
    random (it differs between fresh blocks of seeds 0 and 1) is *fresh-looking* when its
    rel_dist is within 0.15 of sqrt(2), the distance between two independent draws. A
    deterministic one (the same in both, e.g. the gate's alpha * 1 or a zero bias) has
    *drifted* when its rel_dist exceeds 1e-4. The verdict is TRAINED when some movable
    (trainable) deterministic tensor drifted, else FROZEN.
    """
    fresh, other = fresh_block(config, FRESH_SEED), fresh_block(config, FRESH_SEED + 1)
    other_state = other.state_dict()
    trainable = {name for name, p in fresh.named_parameters() if p.requires_grad}
    rows = []
    for name, init in fresh.state_dict().items():
        tensor = saved[name].float()
        distance = float((tensor - init).norm() /
                         max(float(tensor.norm()), float(init.norm()), 1e-30))
        random_init = not torch.equal(init, other_state[name])
        row = {"tensor": name, "init": "random" if random_init else "deterministic",
               "movable": name in trainable, "rel_dist": distance}
        if random_init:
            row["fresh_looking"] = abs(distance - FRESH_DISTANCE) <= FRESH_BAND
        else:
            row["drifted"] = distance > DRIFT_FLOOR
        rows.append(row)
    randoms = [r for r in rows if r["init"] == "random"]
    movable = [r for r in rows if r["init"] == "deterministic" and r["movable"]]
    drifted = sum(r["drifted"] for r in movable)
    return {"tensors": rows,
            "random_fresh_looking": [sum(r["fresh_looking"] for r in randoms), len(randoms)],
            "movable_deterministic_drifted": [drifted, len(movable)],
            "verdict": "TRAINED" if drifted else "FROZEN"}
