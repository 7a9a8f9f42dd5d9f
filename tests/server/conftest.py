"""Fixtures for the server tests; the launcher is ``server.local`` (``support.py``).

One talan-serve process on a tiny Llama (``--deterministic``, a small admission limit so
the 429 test can reach it) and vLLM's own offline engine with the same settings serve
every module of this package that does not start a server of its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.server.support import MAX_LEN, start_server


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server")


@pytest.fixture(scope="package")
def model_dir(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="package")
def server(model_dir, tmp_path_factory: pytest.TempPathFactory):
    proc = start_server(model_dir, tmp_path_factory.mktemp("shared-server"), "--deterministic",
                        "--max-queued-requests", "40")
    yield proc
    proc.stop()


@pytest.fixture(scope="package")
def client(server):
    return server.openai()


@pytest.fixture(scope="package")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="package")
def reference(model_dir):
    """vLLM's own engine, in-process, with the server's deterministic engine settings."""
    from vllm import LLM

    # Until the package's end: servers started meanwhile inherit these too.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        env.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        llm = LLM(model=str(model_dir), dtype="float32", max_model_len=MAX_LEN,
                  enforce_eager=True, max_num_seqs=1, enable_prefix_caching=False, seed=0)
        yield llm
        del llm
