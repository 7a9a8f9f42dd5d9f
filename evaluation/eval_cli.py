"""talan-eval: paired lm-eval runs against a live talan-serve endpoint, with statistics.

    talan-eval run --base-url http://127.0.0.1:8000 --model smollm2-talan-demo \\
        --tasks talan_arith --limit 40 --out runs/demo
    talan-eval run ... --twin smollm2-lora-demo --twin-base-url http://127.0.0.1:8001
    talan-eval stats runs/q8b runs/q32b --out runs/all

``run`` evaluates two sides item by item: the model with TALAN on, and either the same
model with TALAN off (one server, the per-request switch; the default) or a twin model
(``--twin``, e.g. the LoRA-only checkpoint). Greedy; the server must run with
``--deterministic`` so that an item's answer does not depend on what else is in flight.
It writes each side's per-item results, the paired statistics (``evaluation.stats``) as
Markdown and JSON, and a plot of the per-task deltas with their bootstrap CIs. ``stats``
recomputes the table over several runs (cells = model x task), with the sign test
across them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import httpx

from evaluation.tasks import DEMO_TASK, PAPER_TASKS, demo_system_prompt, missing_data

logger = logging.getLogger("talan-eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="talan-eval", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="evaluate TALAN on vs its baseline, item by item")
    run.add_argument("--base-url", required=True, help="the server's root, e.g. "
                     "http://127.0.0.1:8000")
    run.add_argument("--model", required=True, help="the served TALAN model's name")
    run.add_argument("--twin", default=None, help="baseline: this served model (TALAN off "
                     "on the same model when not given)")
    run.add_argument("--twin-base-url", default=None, help="the twin's server (default: "
                     "--base-url)")
    run.add_argument("--tasks", nargs="+", required=True,
                     help=f"lm-eval task names, the paper's ({', '.join(PAPER_TASKS)}) or "
                          f"the demo's held-out set ({DEMO_TASK})")
    run.add_argument("--include-path", action="append", default=[],
                     help="a folder of your own lm-eval task configs (repeatable)")
    run.add_argument("--api", choices=("auto", "chat", "completions"), default="auto",
                     help="chat applies the model's chat template (auto: chat for "
                          f"{DEMO_TASK}, else completions)")
    run.add_argument("--tokenizer", default=None, help="HF tokenizer folder for the "
                     "completions API (needed by loglikelihood tasks)")
    run.add_argument("--limit", type=int, default=None, help="first N items of each task")
    run.add_argument("--num-concurrent", type=int, default=4)
    run.add_argument("--api-key", default=os.environ.get("TALAN_SERVE_API_KEY"))
    run.add_argument("--allow-nondeterministic", action="store_true",
                     help="evaluate a server without --deterministic")
    run.add_argument("--bootstrap-samples", type=int, default=10_000)
    run.add_argument("--out", required=True, help="folder for the results")
    stats = commands.add_parser("stats", help="the paired table over several runs")
    stats.add_argument("runs", nargs="+", help="folders written by 'talan-eval run'")
    stats.add_argument("--bootstrap-samples", type=int, default=10_000)
    stats.add_argument("--out", required=True)
    return parser


def served_card(base_url: str, model: str, api_key: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{base_url.rstrip('/')}/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as error:
        raise SystemExit(f"talan-eval: no server at {base_url}: {error}") from None
    if response.status_code != 200:
        raise SystemExit(f"talan-eval: {base_url}/v1/models answered {response.status_code}: "
                         f"{response.text[:300]}")
    cards = {card["id"]: card for card in response.json()["data"]}
    if model not in cards:
        raise SystemExit(f"talan-eval: {base_url} serves {', '.join(cards)}, not {model!r}")
    return cards[model]


def resolve_tasks(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """lm-eval task names to run, and the requested tasks that cannot run, with why."""
    missing = missing_data(names)
    run = [PAPER_TASKS[n][0] if n in PAPER_TASKS else n for n in names if n not in missing]
    return run, missing


def lm_eval_model(base_url: str, model: str, talan: str, chat: bool, args) -> Any:
    from evaluation.lm_eval_models import TalanChatCompletions, TalanCompletions

    root = base_url.rstrip("/")
    common = dict(model=model, talan=talan, num_concurrent=args.num_concurrent,
                  max_retries=1)
    if args.api_key:
        common["header"] = {"Authorization": f"Bearer {args.api_key}"}
    if chat:
        return TalanChatCompletions(base_url=f"{root}/v1/chat/completions",
                                    tokenizer_backend=None, tokenized_requests=False, **common)
    if args.tokenizer:
        return TalanCompletions(base_url=f"{root}/v1/completions", tokenizer=args.tokenizer,
                                tokenizer_backend="huggingface", tokenized_requests=True,
                                **common)
    return TalanCompletions(base_url=f"{root}/v1/completions", tokenizer_backend=None,
                            tokenized_requests=False, **common)


def evaluate_side(lm: Any, tasks: list[str], chat: bool, args, include: list[str]) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    system = demo_system_prompt() if chat and DEMO_TASK in tasks else None
    if "mbpp" in tasks:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # MBPP scores by running the code
    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, limit=args.limit, log_samples=True, bootstrap_iters=0,
        apply_chat_template=chat, fewshot_as_multiturn=chat, system_instruction=system,
        task_manager=TaskManager(include_path=include or None),
        confirm_run_unsafe_code="mbpp" in tasks, random_seed=0, numpy_random_seed=0,
        torch_random_seed=0, fewshot_random_seed=0)


def run(args: argparse.Namespace) -> int:
    from evaluation.paired import compare, items_of, render, write_side
    from evaluation.tasks import write_demo_task

    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise SystemExit("talan-eval runs lm-evaluation-harness: pip install "
                         "'talan-serve[eval]'") from None
    out = Path(args.out)
    card = served_card(args.base_url, args.model, args.api_key)
    twin_url = args.twin_base_url or args.base_url
    if args.twin is None and not card["talan"]:
        raise SystemExit(f"talan-eval: {args.model} has no TALAN to switch off; name the "
                         "TALAN model, or a baseline with --twin")
    cards = [card] + ([served_card(twin_url, args.twin, args.api_key)] if args.twin else [])
    for served in cards:
        if not served.get("deterministic") and not args.allow_nondeterministic:
            raise SystemExit(f"talan-eval: {served['id']} is served without --deterministic, "
                             "so an item's answer may depend on what else is in flight; "
                             "restart it with --deterministic (or pass "
                             "--allow-nondeterministic)")
    tasks, missing = resolve_tasks(args.tasks)
    for reason in missing.values():
        logger.warning("skipped: %s", reason)
    if not tasks:
        print("talan-eval: no task can run here:\n  " + "\n  ".join(missing.values()),
              file=sys.stderr)
        return 2
    chat = args.api == "chat" or (args.api == "auto" and DEMO_TASK in tasks)
    include = list(args.include_path)
    if DEMO_TASK in tasks:
        include.append(str(write_demo_task(out / "tasks")))
    label = args.twin or f"{args.model} (TALAN off)"
    sides = [("talan", args.base_url, args.model, "on"),
             ("baseline", twin_url, args.twin or args.model, "default" if args.twin else "off")]
    per_side = {}
    for side, url, model, switch in sides:
        logger.info("evaluating %s: %s at %s, TALAN %s, tasks %s", side, model, url, switch,
                    ", ".join(tasks))
        results = evaluate_side(lm_eval_model(url, model, switch, chat, args), tasks, chat,
                                args, include)
        per_side[side] = items_of(results)
        write_side(out / side, per_side[side], {"model": model, "base_url": url,
                                                "talan": switch, "api": "chat" if chat
                                                else "completions", "limit": args.limit})
        for name, task in per_side[side].items():
            logger.info("%s %s: %s = %.4f (lm-eval) over %d items", side, name, task.metric,
                        task.reported, len(task.items))
    cells = {name: (per_side["talan"][name].items, per_side["baseline"][name].items)
             for name in per_side["talan"]}
    labels = (args.model, label)
    results, sign = compare(cells, args.bootstrap_samples)
    write_comparison(out, results, sign, labels, {"model": args.model, "baseline": label,
                                                  "skipped": missing})
    print(render(results, sign, labels))
    return 0


def write_comparison(out: Path, results, sign, labels, meta: dict) -> None:
    from evaluation.paired import plot, render

    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(f"# {labels[0]} vs {labels[1]}\n\n"
                                    + render(results, sign, labels))
    (out / "compare.json").write_text(json.dumps(
        {"meta": meta, "sign_test": sign, "cells": [r.to_dict() for r in results]},
        indent=2) + "\n")
    plot(results, out / "deltas.png", labels)


def stats(args: argparse.Namespace) -> int:
    from evaluation.paired import compare, read_side

    cells = {}
    for folder in map(Path, args.runs):
        model = json.loads((folder / "talan" / "summary.json").read_text())["meta"]["model"]
        talan, base = read_side(folder / "talan"), read_side(folder / "baseline")
        for task in talan:
            cells[f"{model}/{task}"] = (talan[task], base[task])
    labels = ("TALAN+LoRA", "baseline")
    results, sign = compare(cells, args.bootstrap_samples)
    write_comparison(Path(args.out), results, sign, labels, {"runs": args.runs})
    from evaluation.paired import render

    print(render(results, sign, labels))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return run(args) if args.command == "run" else stats(args)


if __name__ == "__main__":
    sys.exit(main())
