"""The training stack on CUDA: DeepSpeed ZeRO-2 (the paper's setup), bf16 with gradient
checkpointing, and FSDP. Skipped where there is no CUDA device (FSDP: fewer than two)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.recipe import Recipe
from training.run import run

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
REPO = Path(__file__).resolve().parents[2]


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _launch(recipe: Recipe, processes: int, path: Path) -> None:
    path.write_text(recipe.to_yaml())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={processes}", "-m", "training.cli", str(path), "--no-progress"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("engine", ["deepspeed", "fsdp"])
def test_sharded_engines_on_gpus_equal_accumulation_in_one_process(make_recipe, tmp_path,
                                                                   engine):
    gpus = torch.cuda.device_count()
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    if engine == "fsdp" and gpus < 2:
        pytest.skip("FSDP shards over two or more GPUs")
    processes = min(gpus, 2)
    single = make_recipe(tmp_path / "one", grad_accum=2)
    single.adapter.dropout = 0.0
    run(single, progress=False)
    sharded = make_recipe(tmp_path / engine, grad_accum=2 // processes)
    sharded.adapter.dropout, sharded.distributed.engine = 0.0, engine
    _launch(sharded, processes, tmp_path / f"{engine}.yaml")
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / engine)
    assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-3
    manifest = json.loads((tmp_path / engine / "run_manifest.json").read_text())
    assert manifest["environment"]["accelerate_distributed_type"] == (
        "DEEPSPEED" if engine == "deepspeed" else "FSDP")


def test_bf16_with_checkpointing_keeps_the_axes_and_tracks_fp32(make_recipe, tiny_talan,
                                                                tmp_path):
    talan = {**tiny_talan, "freeze_steps": 1, "activate_steps": 3}
    losses = {}
    for precision, checkpointing in (("fp32", False), ("bf16", True)):
        recipe = make_recipe(tmp_path / precision, talan=talan, precision=precision,
                             gradient_checkpointing=checkpointing)
        recipe.adapter.dropout = 0.0
        result = run(recipe, progress=False)
        assert [r.talan_active for r in result.records] == [False] + [True] * 5
        assert [r.talan_training for r in result.records] == [False, True, True] + [False] * 3
        losses[precision] = [r.loss for r in result.records]
        assert result.manifest["training"]["resolved"]["compute_dtype"] == (
            "bfloat16" if precision == "bf16" else "float32")
    assert max(abs(a - b) for a, b in zip(losses["fp32"], losses["bf16"], strict=True)) < 0.05
