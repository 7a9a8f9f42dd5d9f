"""``talan-train``: run a recipe, audit a pair of runs, or write the demo data.

    talan-train RECIPE.yaml [--output-dir DIR] [--lora-only] [--max-steps N] [--resume]
    torchrun --nproc-per-node N -m training.cli RECIPE.yaml     # or: accelerate launch
    talan-train audit RUN_A RUN_B          # exit 1 if anything but TALAN differs
    talan-train make-data TRAIN.jsonl [--train N] [--heldout N] [--seed S]
"""

from __future__ import annotations

import argparse
import logging
import sys

COMMANDS_HELP = """commands:
  talan-train RECIPE.yaml [options]     train one run of a recipe (this page)
  talan-train audit RUN_A RUN_B         list every training-side difference between two
                                        runs; exit 1 if anything but TALAN differs
  talan-train make-data TRAIN.jsonl     write the demo's arithmetic train + held-out data
  (each command has its own --help)

the matched pair, e.g. the demo on the offline default model:
  talan-train training/recipes/smollm2-lora-demo.yaml
  talan-train training/recipes/smollm2-talan-demo.yaml
  talan-train audit checkpoints/smollm2-lora-demo checkpoints/smollm2-talan-demo

one command in every launch (the recipe's `distributed` section picks DDP, FSDP or
DeepSpeed; effective batch = per_device_batch_size x grad_accum x processes):
  talan-train RECIPE.yaml
  torchrun --nproc-per-node 2 $(which talan-train) RECIPE.yaml
  accelerate launch --num-processes 2 $(which talan-train) RECIPE.yaml
"""


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="talan-train", description="Train LoRA(+TALAN) from a recipe, or audit two runs.",
        epilog=COMMANDS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe YAML (see training/recipes/)")
    parser.add_argument("--output-dir", "--output", dest="output_dir",
                        help="override the recipe's output_dir")
    parser.add_argument("--lora-only", action="store_true",
                        help="drop the talan section: the recipe's matched LoRA-only baseline")
    parser.add_argument("--max-steps", type=int, help="override schedule.max_steps (smoke runs)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest output_dir/checkpoint-N "
                             "(schedule.save_steps writes them)")
    parser.add_argument("--keep-effective-batch", action="store_true",
                        help="on a launch of another size than schedule.world_size, rescale "
                             "grad_accum so that the effective batch stays the recipe's")
    parser.add_argument("--no-progress", action="store_true", help="log lines, no tqdm bar")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (1 is steadier on a CPU shared with other jobs)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from training.distributed import LaunchError, close_process_group
    from training.recipe import Recipe, RecipeError
    from training.resume import ResumeError
    from training.run import run

    try:
        recipe = Recipe.load(args.recipe)
    except RecipeError as err:
        print(f"talan-train: {err}", file=sys.stderr)
        return 2
    if args.output_dir:
        recipe.output_dir = args.output_dir
    if args.lora_only:
        recipe.talan = None
        recipe.name = f"{recipe.name}-lora-only"
    if args.max_steps:
        recipe.schedule.max_steps = args.max_steps
    try:
        result = run(recipe, progress=not args.no_progress, resume=args.resume,
                     keep_effective_batch=args.keep_effective_batch)
    except (FileNotFoundError, LaunchError, ResumeError) as err:
        print(f"talan-train: {err}", file=sys.stderr)
        return 2
    close_process_group()  # only after success: a failed rank must not wait on the others
    if not result.manifest:  # not the main process: it writes nothing
        return 0
    summary = result.manifest["results"]
    print(f"{recipe.name}: loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} "
          f"in {summary['train_seconds']:.0f}s ({summary['tokens_per_second']:.0f} tok/s); "
          f"checkpoint and manifest in {result.output_dir}")
    return 0


def _audit(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="talan-train audit",
        description="List every training-side difference between two runs.")
    parser.add_argument("run_a", help="run directory (or its run_manifest.json)")
    parser.add_argument("run_b")
    args = parser.parse_args(argv)
    from training.audit import audit

    differences, report = audit(args.run_a, args.run_b)
    print(report)
    return 1 if any(d.kind == "training" for d in differences) else 0


def _make_data(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="talan-train make-data",
        description="Write the arithmetic word-problem train + held-out JSONL.")
    parser.add_argument("train_file", help="training JSONL to write; held-out goes beside it")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--heldout", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    from training.arithmetic import write_splits

    held = write_splits(args.train_file, args.train, args.heldout, args.seed)
    print(f"wrote {args.train_file} ({args.train}) and {held} ({args.heldout})")
    return 0


COMMANDS = {"audit": _audit, "make-data": _make_data}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    return _train(argv)


if __name__ == "__main__":
    sys.exit(main())
