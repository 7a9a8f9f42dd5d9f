"""Shared fixtures: tiny random hosts built once per test session, offline."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _one_vllm_cache(tmp_path_factory: pytest.TempPathFactory):
    """One vLLM cache for every engine of the session, as a host has: what vLLM learns of
    a model class is kept there (a cold cache costs each engine's start a process that
    imports vLLM, about 10 s here)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm-cache")))
        yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_model("qwen3")`` -> directory of a tiny random-weight host + tokenizer."""
    from talan_serve.testing import build_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_model(arch, root / arch)
        return built[arch]

    return get
