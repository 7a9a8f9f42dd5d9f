"""What the server tests share: a test server's settings and lm-eval on local files."""

from __future__ import annotations

import json
import random
from pathlib import Path

from server.local import LocalServer, start_local_server

API_KEY = "test-key-0123456789"
SERVED_NAME = "tiny"
MAX_LEN = 512


def start_server(model_dir: Path, workdir: Path, *extra: str) -> LocalServer:
    """``talan-serve`` for tests: fp32, eager, a short context, an API key, name ``tiny``."""
    return start_local_server(
        model_dir, workdir, "--served-model-name", SERVED_NAME, "--dtype", "float32",
        "--max-model-len", str(MAX_LEN), "--enforce-eager", "--log-level", "warning", *extra,
        api_key=API_KEY,
    )


def engine_text(output, tokenizer) -> str:
    """The engine's text as the server reports it.

    One deliberate difference from vLLM's own server: when a sequence stops at its
    length, talan-serve also returns the bytes vLLM's incremental detokenizer still
    holds (an unfinished multi-byte character, shown as U+FFFD), as a full decode does.
    """
    if output.finish_reason != "length":
        return output.text
    full = tokenizer.decode(output.token_ids, skip_special_tokens=True)
    return full if full.startswith(output.text) else output.text


def engine_run(llm, token_ids, **params):
    from vllm import SamplingParams

    return llm.generate([{"prompt_token_ids": token_ids}], SamplingParams(**params),
                        use_tqdm=False)[0]


WORDS = "the water call first who people side number sound apples sum total solve".split()


def write_tasks(root: Path) -> Path:
    """Two lm-eval tasks over local jsonl (no downloads): ``tiny_mc`` (loglikelihood,
    multiple choice, acc) and ``tiny_gen`` (generate_until, exact_match)."""
    rng = random.Random(0)
    mc = [{"question": " ".join(rng.choice(WORDS) for _ in range(6)),
           "choices": [" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
                       for _ in range(4)],
           "label": rng.randrange(4)} for _ in range(12)]
    gen = [{"question": "Question: " + " ".join(rng.choice(WORDS) for _ in range(5)) +
            "\nAnswer:", "answer": rng.choice(WORDS)} for _ in range(8)]
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    (root / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in gen))
    common = "dataset_path: json\ntest_split: test\n"
    (root / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}"
        f"dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n")
    (root / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}"
        f"dataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n', '.']\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return root


def evaluate(model, task_manager, tasks, **kwargs):
    """``lm_eval.simple_evaluate`` keeping per-sample outputs, without bootstrap stderr."""
    import lm_eval

    return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=task_manager,
                                   log_samples=True, bootstrap_iters=0, **kwargs)


def samples(results, task):
    """Per-document records of one task, in document order."""
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def bench_module(name: str):
    """A module of ``bench/`` (scripts, not a package)."""
    import importlib
    import sys

    path = str(Path(__file__).resolve().parents[2] / "bench")
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module(name)


def wait_idle(server, timeout: float = 120) -> None:
    """Until no request runs in the server or the engine."""
    bench_module("soak_server").wait_until_idle(server, timeout)
