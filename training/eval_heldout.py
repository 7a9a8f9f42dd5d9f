"""Held-out accuracy of trained runs through the HF reference (greedy decoding).

    python -m training.eval_heldout RUN_DIR [RUN_DIR ...] [--n 40] [--base] [--out FILE]

Each RUN_DIR is a ``talan-train`` output (checkpoint + run manifest). The held-out file
defaults to the generated sibling of the run's training file; every run is scored on the
same first ``--n`` problems, with the same prompts (system + user turns, chat template,
generation prompt), greedy, fp32. A problem is correct when the integer after "answer
is" (else the last integer) equals the reference answer. ``--base`` also scores the base
model alone. This is the reference measurement; the served one goes through the server.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from training.arithmetic import extract_answer, heldout_path, write_splits
from training.manifest import read_manifest


def load_problems(path: str | Path, n: int) -> list[dict[str, Any]]:
    records = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    return records[:n]


def prompts_of(tokenizer: Any, problems: list[dict[str, Any]]) -> list[str]:
    return [tokenizer.apply_chat_template([m for m in p["messages"] if m["role"] != "assistant"],
                                          tokenize=False, add_generation_prompt=True)
            for p in problems]


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: list[str], batch_size: int,
             max_new_tokens: int) -> list[str]:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt",
                          padding=True, add_special_tokens=False)
        generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
        new = generated[:, batch["input_ids"].shape[1]:]
        outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    return outputs


def score(problems: list[dict[str, Any]], outputs: list[str]) -> dict[str, Any]:
    items = [{"answer": p["answer"], "predicted": extract_answer(o), "output": o}
             for p, o in zip(problems, outputs, strict=True)]
    correct = sum(i["predicted"] == i["answer"] for i in items)
    return {"n": len(items), "correct": correct, "accuracy": correct / len(items),
            "items": items}


@torch.no_grad()
def perturbation_ratio(model: Any, tokenizer: Any, prompts: list[str]) -> float | None:
    """P1: ||X~ - X||_F / ||X||_F at TALAN's insertion point over the prompts' real tokens."""
    from talan_serve.reference import find_talan, record_perturbation

    if find_talan(model) is None:
        return None
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with record_perturbation(model) as ratios:
        model(**batch)
    return ratios[0]


def evaluate(model_ref: dict[str, Any], problems: list[dict[str, Any]], batch_size: int,
             max_new_tokens: int) -> dict[str, Any]:
    from talan_serve.reference import load_reference

    started = time.perf_counter()
    model, tokenizer = load_reference(model_ref["base"], talan=model_ref.get("checkpoint"))
    prompts = prompts_of(tokenizer, problems)
    outputs = generate(model, tokenizer, prompts, batch_size, max_new_tokens)
    result = score(problems, outputs)
    result["p1_perturbation_ratio"] = perturbation_ratio(model, tokenizer, prompts[:batch_size])
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="talan-train output directories")
    parser.add_argument("--heldout", help="held-out JSONL (default: beside the training file)")
    parser.add_argument("--n", type=int, default=40, help="first N held-out problems")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--base", action="store_true", help="also score the base model alone")
    parser.add_argument("--out", help="write the full results (with outputs) as JSON")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    manifests = {run: read_manifest(run) for run in args.runs}
    first = next(iter(manifests.values()))["training"]
    data = first["recipe"]["data"]
    heldout = Path(args.heldout or heldout_path(data["train_file"]))
    if not heldout.is_file() and args.heldout is None and data.get("generate"):
        # The generated splits are deterministic: rewrite them rather than require them.
        write_splits(data["train_file"], data["generate_train"], data["generate_heldout"],
                     data["generate_seed"])
    problems = load_problems(heldout, args.n)
    base = first["recipe"]["base_model"]
    targets = {Path(run).name: {"base": manifests[run]["training"]["recipe"]["base_model"],
                                "checkpoint": run} for run in args.runs}
    if args.base:
        targets = {"base-model": {"base": base}, **targets}

    torch.manual_seed(0)
    results: dict[str, Any] = {"heldout": str(heldout), "n": len(problems),
                               "decoding": {"greedy": True, "max_new_tokens": args.max_new_tokens,
                                            "dtype": "float32", "engine": "hf-reference"},
                               "runs": {}}
    for name, ref in targets.items():
        result = evaluate(ref, problems, args.batch_size, args.max_new_tokens)
        results["runs"][name] = result
        p1 = result["p1_perturbation_ratio"]
        print(f"{name}: {result['correct']}/{result['n']} = {result['accuracy']:.1%} "
              f"({result['seconds']:.0f}s)" + ("" if p1 is None else f"; P1 ||dX||/||X|| {p1:.2e}"),
              flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
