"""talan-serve against the plain Hugging Face path, in one run, on the same model and prompts.

The HF path is what a researcher already has: ``load_reference`` (transformers + PEFT +
the TALAN hook) and ``generate``, batched with left padding. The served path is
``talan-serve`` with that many concurrent HTTP clients, one request per batch row. Both
decode greedily for exactly ``--new-tokens`` tokens (EOS ignored) from the same token-id
prompts (the held-out arithmetic problems in the demo's chat format), in fp32.

Modes: TALAN on and TALAN off (the per-request switch; ``talan_disabled`` on the HF side)
for the TALAN+LoRA checkpoint, and the LoRA-only twin (its own checkpoint and server).
Within each repeat the HF and served runs of a (mode, batch) take turns, the order
reversing every other repeat (ABBA); a ratio is the median over repeats of the paired
ratios. With ``--dtypes float32 bfloat16`` a second TALAN server in bf16 is measured too.

    python bench/bench_hf_vs_served.py                 # demo pair, batches 1 8 32, 64 tokens
    python bench/bench_hf_vs_served.py --repeats 5 --output bench/results/hf_vs_served_cpu
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
TALAN, TWIN = "smollm2-talan-demo", "smollm2-lora-demo"


def chat_prompts(tokenizer, count: int) -> list[list[int]]:
    """The first ``count`` held-out problems as chat prompts (system + user turns)."""
    from training.arithmetic import heldout_path
    from training.eval_heldout import load_problems

    problems = load_problems(heldout_path(REPO / "data" / "arith" / "train.jsonl"), count)
    prompts = []
    for problem in problems:
        messages = [m for m in problem["messages"] if m["role"] != "assistant"]
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
        prompts.append(tokenizer(text, add_special_tokens=False).input_ids)
    return prompts


def hf_run(model, tokenizer, prompts: list[list[int]], new_tokens: int, talan: bool) -> float:
    """Seconds for ``generate`` on the batch (left-padded), every row ``new_tokens`` long."""
    from talan_serve.reference import talan_disabled

    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    switch = contextlib.nullcontext() if talan else talan_disabled(model)
    start = time.perf_counter()
    with torch.no_grad(), switch:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    elapsed = time.perf_counter() - start
    assert out.shape[1] - width == new_tokens, out.shape
    return elapsed


async def _served_batch(url: str, name: str, prompts: list[list[int]], new_tokens: int,
                        talan: bool) -> float:
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def one(prompt: list[int]) -> int:
            body = {"model": name, "prompt": prompt, "max_tokens": new_tokens,
                    "temperature": 0, "ignore_eos": True, "talan": {"enabled": talan}}
            response = await client.post("/v1/completions", json=body)
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        counts = await asyncio.gather(*(one(p) for p in prompts))
        elapsed = time.perf_counter() - start
    assert counts == [new_tokens] * len(prompts), counts
    return elapsed


def served_run(server, name: str, prompts, new_tokens: int, talan: bool) -> float:
    return asyncio.run(_served_batch(server.base_url, name, prompts, new_tokens, talan))


def paired(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", nargs="+", default=["float32"],
                   help="served dtypes of the TALAN server; the first is compared with HF")
    p.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                   help="extra talan-serve arguments (last on the command line)")
    p.add_argument("--output", default=None, help="results path without suffix (.json, .md)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from server.local import start_local_server
    from talan_serve.reference import load_reference

    args = parse_args(argv)
    hf = {TALAN: load_reference(TALAN), TWIN: load_reference(TWIN)}
    tokenizer = hf[TALAN][1]
    tokenizer.padding_side = "left"
    prompts = chat_prompts(tokenizer, max(args.batches))
    workdir = Path(tempfile.mkdtemp(prefix="bench-hf-served-"))
    common = ["--max-model-len", "1024", "--log-level", "warning", *args.server_args]
    servers = {(TALAN, dtype): start_local_server(TALAN, workdir, "--dtype", dtype, *common)
               for dtype in args.dtypes}
    servers[(TWIN, args.dtypes[0])] = start_local_server(TWIN, workdir, "--dtype",
                                                          args.dtypes[0], *common)
    with httpx.Client() as client:
        info = {f"{name} {dtype}": client.get(f"{s.base_url}/v1/models").json()["data"][0]
                for (name, dtype), s in servers.items()}
    # (label, checkpoint, TALAN on): the HF side and the served side of each mode.
    modes = [("talan on", TALAN, True), ("talan off", TALAN, False), ("lora-only twin", TWIN, True)]
    runs: dict[str, list[float]] = {}
    try:
        for batch in args.batches:
            rows = prompts[:batch]
            for _label, name, talan in modes:  # warm-up: one short run of each
                hf_run(hf[name][0], tokenizer, rows[:1], 2, talan)
                served_run(servers[(name, args.dtypes[0])], name, rows, 2, talan)
            for repeat in range(args.repeats):
                for label, name, talan in modes:
                    sides = [("hf", None)] + [("served", d) for d in args.dtypes
                                              if (name, d) in servers]
                    for side, dtype in sides if repeat % 2 == 0 else sides[::-1]:
                        if side == "hf":
                            seconds = hf_run(hf[name][0], tokenizer, rows, args.new_tokens,
                                             talan)
                            key = f"{label}|{batch}|hf"
                        else:
                            seconds = served_run(servers[(name, dtype)], name, rows,
                                                 args.new_tokens, talan)
                            key = f"{label}|{batch}|served {dtype}"
                        runs.setdefault(key, []).append(seconds)
                        print(f"{key}: {batch * args.new_tokens / seconds:.1f} tok/s",
                              flush=True)
    finally:
        for server in servers.values():
            server.stop()
    write(args, runs, info)
    return 0


def write(args: argparse.Namespace, runs: dict[str, list[float]], info: dict) -> None:
    served = f"served {args.dtypes[0]}"
    tokens = args.new_tokens
    lines = ["# talan-serve vs the HF reference path (load_reference + generate)", "",
             f"- model: {TALAN} (SmolLM2-135M-Instruct + TALAN + LoRA r=8) and its twin "
             f"{TWIN}; fp32 on both sides unless a column says otherwise",
             f"- {tokens} new tokens per row (greedy, EOS ignored), held-out chat prompts; "
             f"{args.repeats} repeats, HF and served runs alternating (ABBA)",
             f"- served: {json.dumps(info)}",
             f"- host: {torch.get_num_threads()} torch threads on the HF side", "",
             "| mode | batch | HF tok/s | served tok/s | served / HF |",
             "|---|---|---|---|---|"]
    summary = []
    for key in runs:
        label, batch, side = key.split("|")
        if side != "hf":
            continue
        batch = int(batch)
        hf_runs, served_runs = runs[key], runs[f"{label}|{batch}|{served}"]
        speedup = paired(hf_runs, served_runs)  # HF seconds / served seconds
        hf_tps = batch * tokens / statistics.median(hf_runs)
        served_tps = batch * tokens / statistics.median(served_runs)
        summary.append(dict(mode=label, batch=batch, hf_tok_s=hf_tps, served_tok_s=served_tps,
                            served_over_hf=speedup))
        lines.append(f"| {label} | {batch} | {hf_tps:.1f} | {served_tps:.1f} | "
                     f"**{speedup:.2f}x** |")
    lines += ["", "Same server, TALAN on vs TALAN off (time on / time off, paired):", "",
              "| batch | slowdown |", "|---|---|"]
    for batch in args.batches:
        slowdown = paired(runs[f"talan on|{batch}|{served}"], runs[f"talan off|{batch}|{served}"])
        summary.append(dict(mode="served on/off", batch=batch, slowdown=slowdown))
        lines.append(f"| {batch} | {slowdown:.3f}x |")
    for dtype in args.dtypes[1:]:
        lines += ["", f"TALAN on, served {dtype} vs {args.dtypes[0]} (throughput ratio):", "",
                  "| batch | ratio |", "|---|---|"]
        for batch in args.batches:
            ratio = paired(runs[f"talan on|{batch}|{served}"],
                           runs[f"talan on|{batch}|served {dtype}"])
            summary.append(dict(mode=f"served {dtype} / {args.dtypes[0]}", batch=batch,
                                ratio=ratio))
            lines.append(f"| {batch} | {ratio:.2f}x |")
    write_outputs(args.output, lines, {"args": vars(args), "summary": summary, "runs": runs,
                                       "servers": info})


def write_outputs(output: str | None, lines: list[str], record: dict) -> None:
    """Print the Markdown table; with ``output``, write it and the record beside it."""
    text = "\n".join(lines) + "\n"
    print(text)
    if output:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.parent.joinpath(f"{out.name}.md").write_text(text)
        out.parent.joinpath(f"{out.name}.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
