"""Shared fixtures: one tiny random Qwen3 host and a small, learnable chat data set."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from talan_serve.testing import build_tiny_model
from training.recipe import Recipe

WORDS = "one two three four five six seven eight nine ten red blue green big small".split()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from 2 threads, and 1 thread is steady on a shared CPU."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("qwen3", tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 short chats: the assistant repeats the user's words in reverse order."""
    rng = random.Random(0)
    lines = []
    for _ in range(64):
        words = [rng.choice(WORDS) for _ in range(3)]
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": " ".join(words)},
            {"role": "assistant", "content": " ".join(reversed(words))},
        ]}))
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


_TINY_TALAN: dict[str, Any] = dict(
    connection_point="layer_1", n_themes=2, network_type="per_token_mix", mixer_dim=32,
    alpha=0.05,
)


def _make_recipe(model_dir: Path, data: Path, out: Path, talan: dict | None = _TINY_TALAN,
                 **schedule: Any) -> Recipe:
    """A tiny-model recipe; ``talan=None`` gives the matched LoRA-only twin."""
    steps = dict(max_steps=6, per_device_batch_size=4, grad_accum=2, precision="fp32",
                 gradient_checkpointing=False)
    steps.update(schedule)
    return Recipe.from_dict(dict(
        name="tiny", base_model=str(model_dir), output_dir=str(out),
        data=dict(train_file=str(data), max_length=64),
        adapter=dict(type="lora", r=8, alpha=16, dropout=0.1),
        optim=dict(lr=5e-3, warmup_ratio=0.1, max_grad_norm=1.0),
        schedule=steps,
        seed=7, data_seed=11,
        talan=None if talan is None else dict(talan),
    ))


@pytest.fixture(scope="session")
def tiny_talan() -> dict[str, Any]:
    """TALAN fields of the tiny runs (copy before changing)."""
    return dict(_TINY_TALAN)


@pytest.fixture(scope="session")
def make_recipe(tiny_qwen3: Path, chat_file: Path):
    """``make_recipe(out, talan=..., **schedule)``: a tiny run on the shared model and data."""

    def make(out: Path, talan: dict | None = _TINY_TALAN, **schedule: Any) -> Recipe:
        return _make_recipe(tiny_qwen3, chat_file, out, talan, **schedule)

    return make
