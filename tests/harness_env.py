"""The environment an SGLang engine runs in for the tests on this CPU (no SGLang import).

``tests/sglang_harness`` goes first on the engine processes' path: the test-only stand-in
for SGLang's kernel library, and a test-only plugin (probes, a fault for negative
controls, ``pin_memory`` off for LoRA). Used by ``tests/sglang/`` and by the server
contract suite (``tests/contract/``) when it runs the sglang engine.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO / "tests" / "sglang_harness"


def harness_env(**extra: str) -> dict[str, str]:
    """This environment, offline, with the CPU test harness first on the path."""
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(HARNESS), str(REPO), os.environ.get("PYTHONPATH")]))
    return env
