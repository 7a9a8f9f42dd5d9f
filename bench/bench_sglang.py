"""TALAN+LoRA vs LoRA-only on the same SGLang engine, through ``talan-serve --engine sglang``.

Run it in SGLang's environment (``./scripts/setup_sglang.sh``). One server serves the demo
checkpoint (SmolLM2-135M-Instruct + TALAN + LoRA, LoRA merged, the default); a batch of B
concurrent clients decodes greedily for ``--new-tokens`` tokens (EOS ignored) with TALAN
on, and the same batch with TALAN off, which is exactly the LoRA-only model on the very
same engine instance. The two modes take turns in ABBA order; the slowdown is the median
over repeats of the paired time ratios (on / off), as in ``bench_vllm.py``.

Without a GPU, SGLang runs on CPU with the test suite's stand-in for its kernel library
(``tests/sglang_harness``): the ratio then says what TALAN adds to that CPU step, not what
it adds on a GPU.

    .venv-sglang/bin/python bench/bench_sglang.py --output bench/results/sglang_cpu_smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_hf_vs_served import (  # noqa: E402
    REPO,
    TALAN,
    chat_prompts,
    paired,
    served_run,
    write_outputs,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--output", default=None, help="results path without suffix (.json, .md)")
    return p.parse_args(argv)


def engine_env() -> dict[str, str]:
    if torch.cuda.is_available():
        return {}
    # CPU: SGLang's CPU engine, with the test harness's sgl_kernel stand-in first.
    path = os.pathsep.join(filter(None, [str(REPO / "tests" / "sglang_harness"), str(REPO),
                                         os.environ.get("PYTHONPATH")]))
    return {"SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": path}


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    from server.local import start_local_server
    from talan_serve.base_models import default_model_dir

    args = parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    prompts = chat_prompts(tokenizer, max(args.batches))
    workdir = Path(tempfile.mkdtemp(prefix="bench-sglang-"))
    server = start_local_server(TALAN, workdir, "--engine", "sglang", "--dtype", "float32",
                                "--max-model-len", "1024", "--log-level", "warning",
                                env=engine_env(), timeout=900)
    runs: dict[str, list[float]] = {}
    try:
        with server.client() as client:
            info = client.get("/v1/models").json()["data"][0]
        for batch in args.batches:
            rows = prompts[:batch]
            for talan in (True, False):  # warm-up
                served_run(server, TALAN, rows, 2, talan)
            for repeat in range(args.repeats):
                order = (True, False) if repeat % 2 == 0 else (False, True)
                for talan in order:
                    key = f"{'talan+lora' if talan else 'lora-only'}|{batch}"
                    seconds = served_run(server, TALAN, rows, args.new_tokens, talan)
                    runs.setdefault(key, []).append(seconds)
                    print(f"{key}: {batch * args.new_tokens / seconds:.1f} tok/s", flush=True)
    finally:
        server.stop()
    write(args, runs, info)
    return 0


def write(args: argparse.Namespace, runs: dict[str, list[float]], info: dict) -> None:
    import sglang

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        "CPU with the test stand-in for sgl_kernel (tests/sglang_harness)"
    lines = ["# TALAN+LoRA vs LoRA-only on the same SGLang engine", "",
             f"- sglang {sglang.__version__}, torch {torch.__version__}, {device}",
             f"- {TALAN} through talan-serve --engine sglang, fp32, LoRA merged; "
             f"served: {json.dumps(info)}",
             f"- {args.new_tokens} new tokens per row (greedy, EOS ignored), B concurrent "
             f"clients; {args.repeats} repeats, the modes alternating (ABBA)", "",
             "| batch | TALAN+LoRA tok/s | LoRA-only tok/s | slowdown (paired median) | "
             "single repeats |", "|---|---|---|---|---|"]
    summary = []
    for batch in args.batches:
        on, off = runs[f"talan+lora|{batch}"], runs[f"lora-only|{batch}"]
        slowdown = paired(on, off)
        singles = [a / b for a, b in zip(on, off, strict=True)]
        summary.append(dict(batch=batch, slowdown=slowdown, singles=singles,
                            on_tok_s=batch * args.new_tokens / statistics.median(on),
                            off_tok_s=batch * args.new_tokens / statistics.median(off)))
        lines.append(f"| {batch} | {summary[-1]['on_tok_s']:.1f} | "
                     f"{summary[-1]['off_tok_s']:.1f} | **{slowdown:.3f}x** | "
                     f"{min(singles):.3f}-{max(singles):.3f} |")
    write_outputs(args.output, lines, {"args": vars(args), "summary": summary, "runs": runs,
                                       "server": info})


if __name__ == "__main__":
    sys.exit(main())
