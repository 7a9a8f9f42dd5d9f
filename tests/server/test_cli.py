"""talan-serve's command line without an engine: the engines' policy on a machine without
a GPU, the resolution of --adapters, and a missing engine answered in one line."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from server.backends.template import UsageError
from server.backends.vllm import VllmBackend, cpu_thread_binding
from server.cli import build_parser


def test_small_hosts_give_the_workers_every_core():
    assert cpu_thread_binding([0, 1], 1) == "0,1"
    assert cpu_thread_binding([0, 1], 2) == "0|1"  # a tensor-parallel pair on 2 cores
    assert cpu_thread_binding([2, 3, 5], 1) == "2,3,5"  # the CPUs this process may use
    assert cpu_thread_binding(list(range(8)), 2) == "0,1,2,3|4,5,6,7"
    assert cpu_thread_binding(list(range(16)), 1) is None  # vLLM's own binding
    with pytest.raises(UsageError, match="need at least 4 CPUs"):
        cpu_thread_binding([0, 1], 4)


def test_cpu_defaults_set_the_engine_environment(monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the defaults without a GPU")
    for name in ("VLLM_CPU_OMP_THREADS_BIND", "MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_",
                 "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    VllmBackend.configure(build_parser().parse_args([]))
    import os

    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0,1"
    assert (os.environ["MALLOC_ARENA_MAX"], os.environ["MALLOC_TRIM_THRESHOLD_"]) == \
        ("2", str(2**20))
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"
    args = build_parser().parse_args([])
    VllmBackend.configure(args)
    assert args.dtype == "float32"  # bf16 without native bf16 arithmetic is slower
    assert args.enforce_eager is True
    args = build_parser().parse_args(["--dtype", "bfloat16"])
    VllmBackend.configure(args)
    assert args.dtype == "bfloat16"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # the user's choice stays
    VllmBackend.configure(build_parser().parse_args(["--kv-cache-memory-bytes", "1000000"]))
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ


def test_ray_is_refused_on_cpu_by_name(capsys):
    import torch

    from server.cli import main

    if torch.cuda.is_available():
        pytest.skip("the defaults without a GPU")
    args = build_parser().parse_args(["-tp", "2", "--distributed-executor-backend", "ray"])
    with pytest.raises(UsageError, match="does not support the Ray executor"):
        VllmBackend.configure(args)
    if importlib.util.find_spec("vllm") is not None:  # the refusal reaches the user as usage
        assert main(["--distributed-executor-backend", "ray", "-tp", "2"]) == 2
        assert "does not support the Ray executor" in capsys.readouterr().err


def test_sglang_policy_refuses_what_it_cannot_serve():
    from server.backends.sglang import SglangBackend

    for argv, message in (
        (["--distributed-executor-backend", "ray"], "is vLLM's"),
        (["--adapters", "x=y", "-pp", "2"], "serve many adapters on one pipeline stage"),
    ):
        with pytest.raises(UsageError, match=message):
            SglangBackend.configure(build_parser().parse_args(argv))


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_a_missing_engine_is_one_line_naming_its_setup(engine):
    """``talan-serve --engine E`` where E is not installed: exit 2, one line naming the
    set-up command and how to run from that environment, no traceback."""
    if importlib.util.find_spec(engine) is not None:
        pytest.skip(f"{engine} is installed in this environment")
    result = subprocess.run([sys.executable, "-m", "server.cli", "--engine", engine],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    setup = {"vllm": "./scripts/setup.sh", "sglang": "./scripts/setup_sglang.sh"}[engine]
    assert setup in lines[0] and f"the {engine} engine is not installed" in lines[0]
    if engine == "sglang":
        assert ".venv-sglang/bin/talan-serve --engine sglang" in lines[0]


def test_adapters_resolve_to_a_base_and_named_checkpoints(tmp_path):
    from server.cli import resolve
    from talan_serve.checkpoint import read_manifest
    from talan_serve.registry import REPO_CHECKPOINTS

    demo = REPO_CHECKPOINTS / "smollm2-talan-demo"
    twin = REPO_CHECKPOINTS / "smollm2-lora-demo"
    plan = resolve(build_parser().parse_args(["--adapters", f"twin={twin}"]))
    # The default model is a checkpoint: served beside the others under its own name,
    # and the base model under the name the checkpoint records for it.
    assert plan.adapters == {"smollm2-talan-demo": str(demo), "twin": str(twin)}
    assert plan.served_name == read_manifest(demo)["base_model"]
    assert plan.checkpoint is None
    for argv, message in (
        (["--adapters", "twin"], "expected NAME=CKPT"),
        (["--adapters", f"twin={twin}", f"twin={twin}"], "used twice"),
        (["--adapters", f"x={tmp_path / 'missing'}"], "no such checkpoint directory"),
        (["--adapters", f"x={twin}", "--talan", str(twin)], "give that checkpoint as"),
        (["--adapters", f"x={twin}", "-dp", "2"], "one server per replica"),
        (["--adapter-dir", str(tmp_path / "missing")], "no such directory"),
        # The default model's checkpoint and x are pinned: no place left for the directory.
        (["--adapters", f"x={twin}", "--adapter-dir", str(tmp_path), "--max-adapters", "2"],
         "2 adapters given at start are pinned"),
    ):
        with pytest.raises(UsageError, match=message):
            resolve(build_parser().parse_args(argv))
    # A directory alone makes a server of many: the default model's checkpoint pinned.
    plan = resolve(build_parser().parse_args(["--adapter-dir", str(tmp_path)]))
    assert plan.adapters == {"smollm2-talan-demo": str(demo)} and plan.checkpoint is None


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="starts talan-serve")
def test_a_port_in_use_is_refused_before_the_engine_starts(model_dir, tmp_path):
    """The server binds its port before it starts the engine (whose processes take free
    ports of their own as they start): a taken port is a one-line exit 1, with no engine
    started."""
    import socket

    from server.local import engine_env

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "server.cli", "--model", str(model_dir), "--port", str(port)],
            capture_output=True, text=True, timeout=300, env=engine_env(tmp_path))
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"talan-serve: cannot listen on 127.0.0.1:{port}: [Errno 98] Address already in use" \
        in result.stderr.splitlines()
    assert "EngineCore" not in result.stdout + result.stderr
