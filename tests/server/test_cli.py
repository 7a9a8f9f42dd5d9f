"""talan-serve's CPU defaults (no engine)."""

from __future__ import annotations

import pytest

from server.cli import build_parser, cpu_thread_binding


def test_small_hosts_give_the_workers_every_core():
    assert cpu_thread_binding([0, 1], 1) == "0,1"
    assert cpu_thread_binding([0, 1], 2) == "0|1"  # a tensor-parallel pair on 2 cores
    assert cpu_thread_binding([2, 3, 5], 1) == "2,3,5"  # the CPUs this process may use
    assert cpu_thread_binding(list(range(8)), 2) == "0,1,2,3|4,5,6,7"
    assert cpu_thread_binding(list(range(16)), 1) is None  # vLLM's own binding
    with pytest.raises(SystemExit, match="need at least 4 CPUs"):
        cpu_thread_binding([0, 1], 4)


def test_cpu_defaults_set_the_engine_environment(monkeypatch):
    import torch

    from server.cli import _cpu_defaults

    if torch.cuda.is_available():
        pytest.skip("the CPU-host defaults")
    for name in ("VLLM_CPU_OMP_THREADS_BIND", "MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_",
                 "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    _cpu_defaults(build_parser().parse_args([]))
    import os

    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0,1"
    assert (os.environ["MALLOC_ARENA_MAX"], os.environ["MALLOC_TRIM_THRESHOLD_"]) == \
        ("2", str(2**20))
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"
    args = build_parser().parse_args([])
    _cpu_defaults(args)
    assert args.dtype == "float32"  # bf16 without native bf16 arithmetic is slower
    args = build_parser().parse_args(["--dtype", "bfloat16"])
    _cpu_defaults(args)
    assert args.dtype == "bfloat16"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # the user's choice stays
    _cpu_defaults(build_parser().parse_args(["--kv-cache-memory-bytes", "1000000"]))
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ


def test_ray_is_refused_on_cpu_by_name():
    import torch

    from server.cli import _cpu_defaults

    if torch.cuda.is_available():
        pytest.skip("the CPU-host defaults")
    args = build_parser().parse_args(["-tp", "2", "--distributed-executor-backend", "ray"])
    with pytest.raises(SystemExit, match="does not support the Ray executor"):
        _cpu_defaults(args)


def test_adapters_resolve_to_a_base_and_named_checkpoints(tmp_path):
    from server.cli import PlanError, resolve
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
        (["--adapters", f"x={twin}", "--engine", "sglang", "-pp", "2"],
         "serve many adapters on one pipeline stage"),
        (["--adapters", f"x={twin}", "--talan", str(twin)], "give that checkpoint as"),
        (["--adapters", f"x={twin}", "-dp", "2"], "one server per replica"),
    ):
        with pytest.raises(PlanError, match=message):
            resolve(build_parser().parse_args(argv))
