"""``talan-train`` as separate processes: DDP under torchrun equals accumulation in one
process, and a run killed with SIGKILL resumes to the uninterrupted run's weights.

Real launches on this CPU (gloo); the runs are shared by the module's tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.audit import audit
from training.recipe import Recipe
from training.resume import ResumeError, newest
from training.run import run

DIR = Path(__file__).resolve().parent
STEPS, SAVE_EVERY = 12, 2
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "training.cli", *args, "--no-progress"]


def _torchrun(processes: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={processes}", "-m", "training.cli", *args, "--no-progress"]


def _write(recipe: Recipe, path: Path) -> Path:
    path.write_text(recipe.to_yaml())
    return path


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return {f"{name}:{key}": value for name in ("adapter_model", "talan_model")
            for key, value in load_file(str(run_dir / f"{name}.safetensors")).items()}


def _distance(a: dict, b: dict) -> float:
    return float(sum((a[k] - b[k]).double().pow(2).sum() for k in a) ** 0.5)


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(make_recipe, tiny_talan, tmp_path_factory):
    """The same recipe (dropout on, TALAN with activate_steps and gamma) run four ways:
    one process with grad_accum 2; two DDP processes with grad_accum 1; one process on
    another data order; and killed after its first checkpoint, then resumed."""
    root = tmp_path_factory.mktemp("launches")
    talan = {**tiny_talan, "activate_steps": 6, "grad_scale": 10.0}

    def recipe(name: str, grad_accum: int = 2, **changes) -> Recipe:
        made = make_recipe(root / name, talan=talan, max_steps=STEPS, grad_accum=grad_accum,
                           save_steps=SAVE_EVERY)
        made.name = name
        for key, value in changes.items():
            setattr(made, key, value)
        return made

    one = recipe("one")
    run(one, progress=False)
    run(recipe("other-order", data_seed=12), progress=False)
    # DDP: dropout masks are drawn per process, so a matched comparison has none.
    ddp_pair = {}
    for name, processes, accum in (("one-nodrop", 1, 2), ("ddp", 2, 1)):
        made = recipe(name, grad_accum=accum)
        made.adapter.dropout, made.schedule.save_steps = 0.0, None
        ddp_pair[name] = (processes, _write(made, root / f"{name}.yaml"))
    run(Recipe.load(ddp_pair["one-nodrop"][1]), progress=False)
    done = subprocess.run(_torchrun(2, str(ddp_pair["ddp"][1])), env=ENV, cwd=DIR.parents[1],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = _write(recipe("killed"), root / "killed.yaml")
    process = subprocess.Popen(_cli(str(killed)), env=ENV, cwd=DIR.parents[1],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = root / "killed" / f"checkpoint-{SAVE_EVERY}" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not first.is_file():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted = {p.name for p in (root / "killed").iterdir()}
    assert "talan_model.safetensors" not in interrupted  # the final save never happened
    resumed = subprocess.run(_cli(str(killed), "--resume"), env=ENV, cwd=DIR.parents[1],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"root": root, "one": root / "one", "other-order": root / "other-order",
            "one-nodrop": root / "one-nodrop", "ddp": root / "ddp", "killed": root / "killed",
            "resumed_log": resumed.stderr}


def test_ddp_on_two_processes_equals_accumulation_in_one(runs):
    single, ddp = _losses(runs["one-nodrop"]), _losses(runs["ddp"])
    assert len(single) == len(ddp) == STEPS
    assert max(abs(a - b) for a, b in zip(single, ddp, strict=True)) < 1e-3
    a, b = _weights(runs["one-nodrop"]), _weights(runs["ddp"])
    other = _weights(runs["other-order"])
    same, apart = _distance(a, b), _distance(a, other)
    print(f"DDP vs one process: weight distance {same:.3e}; one process vs another data "
          f"order {apart:.3e}; ratio {same / apart:.3e}")
    assert apart > 0.1 and same / apart < 1e-4
    manifest = json.loads((runs["ddp"] / "run_manifest.json").read_text())
    resolved = manifest["training"]["resolved"]
    assert (resolved["world_size"], resolved["distributed_engine"],
            resolved["grad_accum_per_process"], resolved["effective_batch"]) == (2, "ddp", 1, 8)
    assert manifest["environment"]["launcher"] == "torchrun"
    assert manifest["environment"]["accelerate_distributed_type"] == "MULTI_CPU"


def test_audit_treats_the_launch_as_training_side(runs):
    differences, report = audit(str(runs["one-nodrop"]), str(runs["ddp"]))
    flagged = {d.key for d in differences if d.kind == "training"}
    assert {"training.resolved.world_size", "training.resolved.distributed_engine",
            "training.resolved.grad_accum_per_process"} <= flagged
    assert "training.resolved.effective_batch" not in flagged  # 4 x 2 x 1 == 4 x 1 x 2
    assert "NOT MATCHED" in report


def test_a_killed_run_resumes_to_the_uninterrupted_weights(runs):
    assert "resuming from" in runs["resumed_log"]
    uninterrupted, resumed = _weights(runs["one"]), _weights(runs["killed"])
    assert uninterrupted.keys() == resumed.keys()
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=1e-6)
    assert _losses(runs["killed"]) == pytest.approx(_losses(runs["one"]), abs=1e-6)
    manifest = json.loads((runs["killed"] / "run_manifest.json").read_text())
    assert manifest["results"]["resumed_from_step"] >= SAVE_EVERY


def _copy(folder: Path, root: Path) -> Path:
    target = root / folder.parent.name / folder.name
    shutil.copytree(folder, target)
    return target


def test_resume_refuses_a_corrupt_foreign_or_resized_checkpoint(runs, tmp_path):
    recipe = Recipe.load(runs["root"] / "killed.yaml")
    source = runs["killed"] / f"checkpoint-{SAVE_EVERY}"
    recipe.output_dir = str(tmp_path / "killed")
    folder = _copy(source, tmp_path)
    assert newest(recipe, 1, "none") == (folder, SAVE_EVERY)
    # cut short by a crash: no trainer_state.json, passed over for the complete one
    shutil.copytree(folder, tmp_path / "killed" / "checkpoint-4")
    (tmp_path / "killed" / "checkpoint-4" / "trainer_state.json").unlink()
    assert newest(recipe, 1, "none") == (folder, SAVE_EVERY)
    with pytest.raises(ResumeError, match="written by 1 process.*this launch has 2"):
        newest(recipe, 2, "ddp")
    other = Recipe.load(runs["root"] / "killed.yaml")
    other.output_dir, other.optim.lr = recipe.output_dir, 1e-3
    with pytest.raises(ResumeError, match="another recipe .*optim.lr: 0.005 -> 0.001"):
        newest(other, 1, "none")
    weights = folder / "talan_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ResumeError, match="checksum mismatch"):
        newest(recipe, 1, "none")
    from training.cli import main

    assert main([str(_write(recipe, tmp_path / "r.yaml")), "--resume", "--no-progress"]) == 2
