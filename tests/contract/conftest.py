"""The server contract suite: one set of tests, run against every engine installed here.

Each engine runs in its own environment (vLLM in ``.venv``, SGLang in ``.venv-sglang``),
so the ``engine`` fixture takes the engines the running interpreter can import, and
``./scripts/test.sh`` runs this folder in both environments. A server per module and
engine; ``serve`` starts it the way a user would (``talan-serve --engine E``), with the
test harness's environment for SGLang on this CPU (``tests/harness_env.py``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from server.local import LocalServer, start_local_server
from tests.harness_env import harness_env
from tests.server.support import API_KEY, MAX_LEN, SERVED_NAME

ENGINES = tuple(e for e in ("vllm", "sglang") if importlib.util.find_spec(e) is not None)


def serve(engine: str, model_dir: Path, workdir: Path, *extra: str) -> LocalServer:
    """``talan-serve --engine ENGINE`` for tests: fp32, eager, a short context, an API key,
    the name ``tiny``."""
    args = ("--engine", engine, "--served-model-name", SERVED_NAME, "--dtype", "float32",
            "--max-model-len", str(MAX_LEN), "--enforce-eager", "--log-level", "warning",
            *extra)
    env = None
    if engine == "sglang":
        env = harness_env(TALAN_SERVE_CACHE=str(workdir / "cache"), TALAN_TEST_NO_PIN="1")
    return start_local_server(model_dir, workdir, *args, api_key=API_KEY, env=env,
                              timeout=600)


@pytest.fixture(scope="module", params=ENGINES or [pytest.param(None, marks=pytest.mark.skip(
    reason="no engine installed in this environment"))])
def engine(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, engine: str) -> Path:
    return tmp_path_factory.mktemp(f"contract-{engine}")
