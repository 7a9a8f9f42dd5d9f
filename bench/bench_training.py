"""Training throughput: the Trainer stack against the hand-written loop it replaced.

    python bench/bench_training.py [--baseline-rev fedc843] [--steps 6] [--pairs 2]

Runs the demo recipe (``training/recipes/smollm2-talan-demo.yaml``: SmolLM2-135M, TALAN +
LoRA, 8 x 2 micro-batches of up to 192 tokens) for ``--steps`` optimizer steps, one process,
alternating the two stacks in ABBA pairs on this machine: today's ``talan-train`` and the
one at ``--baseline-rev`` (its ``training/`` and ``talan_serve/`` taken from git, run from a
scratch folder). Throughput is assistant-and-prompt tokens per second of training steps
(each stack's own per-step timing, which excludes model loading and checkpoint writing);
the whole command's wall time is reported beside it. Then the Trainer stack again under
``torchrun`` on two processes (grad_accum 1 each: the same effective batch). Writes
``bench/results/training_cpu_smollm2.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "training" / "recipes" / "smollm2-talan-demo.yaml"


def baseline_tree(rev: str, into: Path) -> Path:
    """``training/`` and ``talan_serve/`` at ``rev``, unpacked into ``into``."""
    archive = subprocess.run(["git", "archive", rev, "training", "talan_serve"], cwd=REPO,
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def recipe_file(scratch: Path, name: str, steps: int, grad_accum: int | None = None) -> Path:
    record = yaml.safe_load(RECIPE.read_text())
    record["name"], record["output_dir"] = name, str(scratch / name)
    record["data"]["train_file"] = str(REPO / record["data"]["train_file"])
    record["schedule"]["max_steps"] = steps
    if grad_accum is not None:
        record["schedule"]["grad_accum"] = grad_accum
    path = scratch / f"{name}.yaml"
    path.write_text(yaml.safe_dump(record, sort_keys=False))
    return path


def train(command: list[str], cwd: Path, env: dict[str, str], out: Path) -> dict[str, float]:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    tokens, seconds = sum(r["tokens"] for r in log), sum(r["seconds"] for r in log)
    return {"tokens": tokens, "step_seconds": round(seconds, 2), "wall_seconds": round(wall, 1),
            "tokens_per_second": round(tokens / seconds, 1),
            "losses": [round(r["loss"], 5) for r in log]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-rev", default="fedc843",
                        help="git revision of the hand-written loop")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "training_cpu_smollm2"))
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    python = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        old_tree = baseline_tree(args.baseline_rev, scratch / "baseline")
        old_env = {**env, "PYTHONPATH": str(old_tree)}
        runs: dict[str, list[dict]] = {"trainer": [], "loop": []}
        for pair in range(args.pairs):
            for stack in (("trainer", "loop") if pair % 2 == 0 else ("loop", "trainer")):
                name = f"{stack}-{pair}"
                recipe = recipe_file(scratch, name, args.steps)
                cwd, run_env = (REPO, env) if stack == "trainer" else (old_tree, old_env)
                result = train([python, "-m", "training.cli", str(recipe), "--no-progress"],
                               cwd, run_env, scratch / name)
                runs[stack].append(result)
                print(f"{name}: {result['tokens_per_second']:.0f} tok/s "
                      f"({result['step_seconds']} s of steps, {result['wall_seconds']} s wall)")
        recipe = recipe_file(scratch, "trainer-2proc", args.steps, grad_accum=1)
        two = train([python, "-m", "torch.distributed.run", "--standalone",
                     "--nproc-per-node=2", "-m", "training.cli", str(recipe), "--no-progress"],
                    REPO, {**env, "OMP_NUM_THREADS": "1"}, scratch / "trainer-2proc")
        print(f"trainer, 2 processes: {two['tokens_per_second']:.0f} tok/s")

    def median(stack: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[stack])

    ratio = median("trainer", "tokens_per_second") / median("loop", "tokens_per_second")
    loss_gap = max(abs(a - b) for t, o in zip(runs["trainer"], runs["loop"], strict=True)
                   for a, b in zip(t["losses"], o["losses"], strict=True))
    record = {
        "recipe": str(RECIPE.relative_to(REPO)), "steps": args.steps,
        "baseline_rev": args.baseline_rev, "machine": platform.machine(),
        "cpus": os.cpu_count(), "runs": runs, "two_processes": two,
        "trainer_over_loop_tokens_per_second": round(ratio, 3),
        "two_over_one_process": round(two["tokens_per_second"]
                                      / median("trainer", "tokens_per_second"), 3),
        "max_loss_difference_to_the_loop": round(loss_gap, 5),
    }
    Path(args.out + ".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# Training throughput: Trainer stack vs the hand-written loop (CPU)", "",
        f"`python bench/bench_training.py --baseline-rev {args.baseline_rev} --steps "
        f"{args.steps} --pairs {args.pairs}` on {os.cpu_count()} CPU cores "
        f"({platform.machine()}): demo recipe, one process, ABBA order.", "",
        "| stack | tok/s (median) | step seconds | wall seconds |", "|---|---|---|---|",
    ]
    for stack in ("loop", "trainer"):
        lines.append(f"| {stack} | {median(stack, 'tokens_per_second'):.0f} | "
                     f"{median(stack, 'step_seconds'):.1f} | {median(stack, 'wall_seconds'):.1f} |")
    lines += ["", f"Trainer / loop: **{ratio:.3f}x** tokens per second "
              f"(goal >= 0.95x). Per-step losses within {loss_gap:.5f} of the loop's.",
              f"Two processes (torchrun, gloo, grad_accum 1 each): "
              f"{two['tokens_per_second']:.0f} tok/s, {record['two_over_one_process']:.2f}x "
              "one process."]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
