"""The tasks ``talan-eval`` knows by name: the paper's four, and the demo's held-out set.

The paper's (lm-eval's own task definitions): GPQA Diamond 0-shot, GSM8K 8-shot CoT,
MATH-500 4-shot, MBPP 3-shot with execution. Their data comes from the Hugging Face hub;
offline, ``missing_data`` names the ones whose datasets are not in the local cache.

``talan_arith`` is the demo's held-out arithmetic set (``data/arith/heldout.jsonl``), as
chat requests with the training prompt's system turn, scored by the training scorer
(``training.arithmetic.extract_answer``): its lm-eval config is written into a folder for
``--include-path``.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_TASK = "talan_arith"
DEMO_DATA = REPO / "data" / "arith" / "heldout.jsonl"

# name: (lm-eval task, few-shot, the dataset it loads, needs code execution)
PAPER_TASKS = {
    "gpqa": ("gpqa_diamond_zeroshot", 0, "Idavidrein/gpqa", False),
    "gsm8k": ("gsm8k_cot", 8, "openai/gsm8k", False),
    "math500": ("minerva_math500", 4, "HuggingFaceH4/MATH-500", False),
    "mbpp": ("mbpp", 3, "google-research-datasets/mbpp", True),
}

_UTILS = '''\
from training.arithmetic import extract_answer


def process_results(doc, results):
    return {"acc": int(extract_answer(results[0]) == doc["answer"])}


def user_turn(doc):
    return next(m["content"] for m in doc["messages"] if m["role"] == "user")
'''


def demo_system_prompt(data: Path = DEMO_DATA) -> str:
    first = json.loads(data.read_text().splitlines()[0])
    return next(m["content"] for m in first["messages"] if m["role"] == "system")


def write_demo_task(root: Path, data: Path = DEMO_DATA, max_new_tokens: int = 96) -> Path:
    """``root`` with the demo task's lm-eval config, for ``include_path``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "talan_arith_utils.py").write_text(_UTILS)
    (root / f"{DEMO_TASK}.yaml").write_text(
        f"task: {DEMO_TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_text: !function talan_arith_utils.user_turn\n"
        "doc_to_target: '{{answer}}'\n"
        f"generation_kwargs:\n  until: []\n  max_gen_toks: {max_new_tokens}\n"
        "  do_sample: false\n  temperature: 0\n"
        "process_results: !function talan_arith_utils.process_results\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return root


def missing_data(names: list[str]) -> dict[str, str]:
    """For the paper's tasks among ``names``: the ones whose dataset is not available
    offline, each with what is missing."""
    from huggingface_hub import scan_cache_dir

    try:
        cached = {repo.repo_id for repo in scan_cache_dir().repos if repo.repo_type == "dataset"}
    except Exception:  # no cache folder at all
        cached = set()
    missing = {}
    for name in names:
        task, _, dataset, _ = PAPER_TASKS.get(name, (name, None, None, None))
        if dataset is not None and dataset not in cached:
            missing[name] = (f"{task}: its dataset {dataset} is not in the local Hugging Face "
                             "cache (download it where the hub is reachable, then copy "
                             "HF_HOME here)")
    return missing
