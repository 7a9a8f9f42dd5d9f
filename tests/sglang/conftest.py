"""The SGLang tests run in SGLang's own environment (``scripts/setup_sglang.sh``).

The engine runs in a child process (``engine_worker.py``) with ``tests/sglang_harness``
first on its path: the test-only stand-in for SGLang's kernel library on this CPU, and a
test-only plugin (probes, a fault for negative controls, ``pin_memory`` off for LoRA).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness_env import harness_env

pytest.importorskip("sglang", reason="the SGLang tests run in the SGLang venv "
                                     "(./scripts/test.sh runs them there)")


def run_engine(model: Path, phases: list, workdir: Path, engine: dict | None = None,
               probe: bool = True, **env: str) -> dict:
    """Serve ``phases`` with an SGLang engine in a child process; what it served, and
    the probe's records (every TALAN layer call) when ``probe``."""
    workdir.mkdir(parents=True, exist_ok=True)
    tag = f"run{len(list(workdir.glob('run*.json')))}"
    out, probe_file = workdir / f"{tag}.out.json", workdir / f"{tag}.probe.jsonl"
    job = workdir / f"{tag}.json"
    job.write_text(json.dumps({"model": str(model), "engine": engine or {},
                               "phases": phases, "out": str(out)}))
    if probe:
        env["TALAN_TEST_PROBE"] = str(probe_file)
    result = subprocess.run([sys.executable, str(Path(__file__).parent / "engine_worker.py"),
                             str(job)], env=harness_env(**env), capture_output=True,
                            text=True, timeout=1500)
    if result.returncode != 0:
        raise RuntimeError(f"the engine failed:\n{result.stderr[-6000:]}")
    served = json.loads(out.read_text())
    served["probe"] = ([json.loads(line) for line in probe_file.read_text().splitlines()]
                       if probe and probe_file.exists() else None)
    return served
