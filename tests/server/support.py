"""What the server tests share: a test server's settings and lm-eval on local files."""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import h11
import httpx

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


def malformed_requests() -> list[tuple[str, bytes, dict]]:
    """(path, body, headers) that a careless or hostile client might send."""
    cases: list[tuple[str, bytes, dict]] = []
    json_type = {"Content-Type": "application/json"}

    def add(path: str, body, headers=json_type):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        cases.append((path, raw, headers))

    comp, chat = "/v1/completions", "/v1/chat/completions"
    for raw in (b"", b"{", b"[]", b"null", b"42", b'"text"', b"{'prompt': 'a'}",
                b'{"prompt": "a",}', b"\xff\xfe\x00", b'{"prompt": "\xff\xfe"}',
                b'{"prompt": "a"' + b" " * 10, b"[" * 100000 + b"]" * 100000,
                b'{"prompt": NaN}', b'{"prompt": "a", "temperature": NaN}',
                b'{"prompt": "a", "temperature": Infinity}',
                b'{"prompt": "a", "max_tokens": 1e999}', b'{"prompt": "\\ud800"}'):
        add(comp, raw)
        add(chat, raw)
    bad_values = {
        "prompt": [None, 5, 1.5, True, "", [], [""], [[]], [-1], [10**12], [1.5], [[1], "a"],
                   {"a": 1}, [[-5]], [None]],
        "max_tokens": [-1, "ten", 10**30, 1.5, [], {}, 10**6],
        "temperature": [-0.1, 2.5, "hot", [], 1e308],
        "top_p": [0, -1, 1.5, "x"],
        "top_k": [-2, 1.5, "x", 2**40],
        "n": [0, -1, 10**9, 1.5, "2", 17],
        "logprobs": [-1, 21, 10**9, "x", 1.5],
        "seed": [2**64, -(2**64), "x", 1.5],
        "stop": [5, [1, 2], [None], ["a"] * 100, {"a": 1}],
        "stream": ["yes", 2, []],
        "echo": ["true", 3],
        "model": [5, [], {}],
        "stream_options": ["x", {"include_usage": "x"}],
        "talan": [True, "off", {"enabled": 3}, []],
        "stop_token_ids": [[-1], "x", [2**40]],
    }
    shared = {"max_tokens", "prompt", "echo", "logprobs"}
    for field, values in bad_values.items():
        for value in values:
            add(comp, {"prompt": "the a", "max_tokens": 2, field: value})
            if field not in shared:  # the sampling fields are common to both endpoints
                add(chat, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                           field: value})
    chat_bad = {
        "messages": [None, [], "hi", [{}], [{"role": "alien", "content": "x"}],
                     [{"role": "user"}, 5], [{"role": "user", "content": 5}],
                     [{"role": "user", "content": [{"type": "image", "url": "x"}]}],
                     [{"role": "user", "content": [{"type": "text"}]}], [[1, 2]]],
        "max_tokens": [0, -5, "x", 10**30],
        "max_completion_tokens": [0, -1, "x"],
        "logprobs": ["yes", 5],
        "top_logprobs": [-1, 21, "x"],
        "temperature": [3, "x"],
        "n": [0, 100],
    }
    for field, values in chat_bad.items():
        for value in values:
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            body[field] = value
            add(chat, body)
    for path in ("/v1/models", "/health", "/metrics", "/v1/completions/x", "/v2/completions",
                 "/v1/embeddings", "/v1/chat", "/"):
        add(path, {"prompt": "a"})
    for prompt in (True, {}, [[1, 2], [3, -1]], [[1], []], [1, "a"], ["a", 1], [[[1]]],
                   "a" * 100_000, "\x00\x01", [2**31], [[2**31 - 1]], -3):
        add(comp, {"prompt": prompt, "max_tokens": 2})
    add(chat, {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2})
    add(comp, {"prompt": "a", "max_tokens": 0})  # 0 only with echo
    add(comp, {"prompt": "a", "max_tokens": 600})  # beyond the context
    add(comp, {"prompt": [[1] * 600]})
    add(comp, {"prompt": "x" * 4000, "max_tokens": 2})
    add(comp, {"prompt": ["a"] * 300})  # batch above the limit
    add(comp, {"prompt": "a", "unknown_field": {"deep": [1, 2, 3]}, "max_tokens": 10**7})
    add(comp, b"x" * (9 * 1024 * 1024))  # oversized body
    add(comp, {"prompt": "a"}, {"Content-Type": "text/plain"} | {"X-Junk": "\x01"})
    add(comp, b'{"prompt": "a", "max_tokens": 2}', {"Content-Type": "application/json",
                                                     "Content-Length": "999999999"})
    return cases


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


def _raw_post(base_url: str, path: str, body: bytes, headers: dict) -> int:
    host, port = base_url.removeprefix("http://").split(":")
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Authorization: Bearer {API_KEY}",
             *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall("\r\n".join(lines).encode() + body)
        status_line = sock.makefile("rb").readline().decode()
    return int(status_line.split()[1])


def send_malformed(base_url: str) -> list[tuple[int, bytes]]:
    """Every ``malformed_requests`` case sent: (status, the body's start). A JSON answer
    to an error is an OpenAI error body (uvicorn itself answers unparseable HTTP with a
    plain-text 400)."""
    statuses = []
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for path, body, extra in malformed_requests():
        try:
            with httpx.Client(base_url=base_url, headers=headers, timeout=60) as c:
                response = c.post(path, content=body, headers=extra)
            statuses.append((response.status_code, body[:80]))
            if response.headers.get("content-type") == "application/json":
                assert response.status_code < 400 or "error" in response.json(), body[:80]
        except (httpx.LocalProtocolError, h11.LocalProtocolError):  # a lying Content-Length
            # httpx refuses to send it: send the bytes as they are.
            statuses.append((_raw_post(base_url, path, body, extra), body[:80]))
    return statuses
