"""``talan-serve --engine sglang --adapters ...``: the multi-adapter server's tests, run
against the SGLang engine (the same front end, the same checks as with vLLM:
``tests/server/test_adapters_server.py``)."""

from __future__ import annotations

import pytest

from tests.server.support import API_KEY, MAX_LEN, SERVED_NAME
from tests.server.test_adapters_server import (  # noqa: F401 - fixtures and tests, reused
    client,
    references,
    setup,
    test_each_model_equals_its_reference,
    test_load_serve_unload_at_run_time,
    test_mixed_concurrent_requests_equal_their_references,
    test_models_list_the_base_and_each_adapter,
)
from tests.sglang.conftest import harness_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("sglang-adapters-server")


@pytest.fixture(scope="module")
def server(setup, workdir):  # noqa: F811 - the imported fixture
    from server.local import start_local_server

    model_dir, paths, _ = setup
    env = harness_env(TALAN_SERVE_CACHE=str(workdir / "cache"), TALAN_TEST_NO_PIN="1")
    proc = start_local_server(
        model_dir, workdir, "--engine", "sglang", "--served-model-name", SERVED_NAME,
        "--dtype", "float32", "--max-model-len", str(MAX_LEN), "--log-level", "warning",
        "--adapters", f"alpha={paths['alpha']}", f"beta={paths['beta']}",
        "--allowed-adapter-dirs", str(paths["gamma"].parent), "--max-lora-rank", "8",
        "--max-talan-slots", "4", api_key=API_KEY, env=env, timeout=600)
    yield proc
    proc.stop()
