"""SGLang engine checks on a GPU host, in SGLang's environment (``./scripts/setup_sglang.sh``).

The demo checkpoint (SmolLM2-135M-Instruct + TALAN + LoRA, LoRA merged) in bf16, greedy,
TALAN on and off, through ``sglang.Engine`` three times: CUDA graphs on, CUDA graphs off,
and deterministic inference on. The check passes when every request's token ids are
equal across the three (TALAN acts on every replayed token: a graph that skipped the side
path would give the TALAN-off ids for TALAN-on requests, which the TALAN on/off difference
shows is not the case). Each engine runs in its own child process.

    .venv-sglang/bin/python bench/sglang_gpu_check.py --out bench/results/gpu_h200
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "cuda_graphs": {},
    "eager": {"disable_cuda_graph": True},
    "deterministic": {"enable_deterministic_inference": True},
}
TEXTS = ["What is 12*7?", "Tom has 3 apples and buys 5 more. How many apples now?",
         "Name a color.", "Write one sentence about the sea."]


def child(config: str, folder: str, out: str) -> None:
    import sglang
    from transformers import AutoTokenizer

    from talan_serve.switch import switch_args

    tokenizer = AutoTokenizer.from_pretrained(folder)
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                              add_generation_prompt=True) for t in TEXTS]
    prompts = [tokenizer(r, add_special_tokens=False).input_ids for r in rendered]
    engine = sglang.Engine(model_path=folder, dtype="bfloat16", random_seed=0,
                           log_level="warning", **CONFIGS[config])
    served = {}
    for talan in (True, False):
        params = [{"temperature": 0.0, "max_new_tokens": 32, "ignore_eos": True,
                   "custom_params": switch_args(talan)}] * len(prompts)
        outputs = engine.generate(input_ids=prompts, sampling_params=params)
        served["on" if talan else "off"] = [o["output_ids"] for o in outputs]
    engine.shutdown()
    Path(out).write_text(json.dumps(served))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/gpu_h200")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    import torch

    from talan_serve.prepared import prepare_model_dir
    from talan_serve.registry import REPO_CHECKPOINTS

    if not torch.cuda.is_available():
        print("sglang_gpu_check: needs a CUDA GPU", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="sglang-gpu-"))
    folder = prepare_model_dir(REPO_CHECKPOINTS / "smollm2-talan-demo", work / "demo").path
    served, errors = {}, {}
    for config in CONFIGS:
        out = work / f"{config}.json"
        result = subprocess.run([sys.executable, __file__, "--child", config, str(folder),
                                 str(out)], capture_output=True, text=True, timeout=900)
        if result.returncode == 0:
            served[config] = json.loads(out.read_text())
        else:
            errors[config] = result.stderr[-4000:]
    reference = served.get("cuda_graphs")
    equal = {c: s == reference for c, s in served.items()}
    talan_acts = reference is not None and reference["on"] != reference["off"]
    report = {"gpu": torch.cuda.get_device_name(0), "ids_equal_to_cuda_graphs": equal,
              "talan_changes_ids": talan_acts, "errors": errors, "served": served,
              "ok": not errors and all(equal.values()) and talan_acts}
    results = Path(args.out)
    results.mkdir(parents=True, exist_ok=True)
    (results / "sglang_gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "served"}, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
