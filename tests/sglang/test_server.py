"""``talan-serve --engine sglang``: the same OpenAI API through the same front end.

One server on a tiny Qwen3 + TALAN + LoRA checkpoint (fp32, deterministic, the CPU test
harness on its path): the OpenAI SDK's greedy completions equal the transformers
reference (ids, logprobs within 1e-4) with TALAN on and off, streamed and not; lm-eval's
loglikelihood through the server equals its ``hf`` backend on the reference; malformed
requests get no 5xx; abandoned streams are aborted in the engine.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.support import (
    API_KEY,
    SERVED_NAME,
    evaluate,
    samples,
    send_malformed,
    wait_idle,
    write_tasks,
)
from tests.sglang.conftest import harness_env
from tests.sglang.parity import TOL

pytestmark = pytest.mark.slow
PROMPTS = ["the water call first who", "Solve 12 plus 7 equals", "a"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("sglang-server")


@pytest.fixture(scope="module")
def checkpoint(tiny_model, workdir):
    from talan_serve.testing import build_tiny_checkpoint

    model_dir = tiny_model("qwen3")
    return model_dir, build_tiny_checkpoint(model_dir, workdir / "checkpoint")


@pytest.fixture(scope="module")
def server(checkpoint, workdir):
    from server.local import start_local_server

    model_dir, ckpt = checkpoint
    env = harness_env(TALAN_SERVE_CACHE=str(workdir / "cache"))
    proc = start_local_server(
        model_dir, workdir, "--engine", "sglang", "--talan", str(ckpt), "--deterministic",
        "--served-model-name", SERVED_NAME, "--dtype", "float32", "--max-model-len", "512",
        "--log-level", "warning", api_key=API_KEY, env=env, timeout=600)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


@pytest.fixture(scope="module")
def reference(checkpoint):
    from talan_serve.reference import load_reference

    model_dir, ckpt = checkpoint
    return load_reference(model_dir, talan=ckpt)


def greedy(model, ids: list[int], steps: int, talan: bool) -> tuple[list[int], list[float]]:
    import contextlib

    import torch

    from talan_serve.reference import talan_disabled

    out_ids, out_lps = [], []
    with torch.no_grad(), contextlib.nullcontext() if talan else talan_disabled(model):
        for _ in range(steps):
            logprobs = model(input_ids=torch.tensor([ids + out_ids])).logits[0, -1]
            logprobs = logprobs.float().log_softmax(-1)
            out_ids.append(int(logprobs.argmax()))
            out_lps.append(float(logprobs[out_ids[-1]]))
    return out_ids, out_lps


def test_models_say_what_is_served(server):
    with server.client() as c:
        (card,) = c.get("/v1/models").json()["data"]
        version = c.get("/version").json()
    assert (card["talan"], card["adapter"], card["dtype"]) == (True, "merged", "float32")
    assert version["engine"] == "sglang"


@pytest.mark.parametrize("talan", [True, False])
def test_greedy_completion_equals_reference(client, reference, talan):
    model, tokenizer = reference
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        want_ids, want_lps = greedy(model, ids, 8, talan)
        kwargs = dict(model=SERVED_NAME, prompt=ids, max_tokens=8, temperature=0, logprobs=0,
                      extra_body={"ignore_eos": True, "talan": {"enabled": talan}})
        response = client.completions.create(**kwargs)
        assert response.choices[0].text == tokenizer.decode(want_ids, skip_special_tokens=True)
        assert response.choices[0].logprobs.token_logprobs == pytest.approx(want_lps, abs=TOL)
        chunks = list(client.completions.create(stream=True, **kwargs))
        assert "".join(c.choices[0].text for c in chunks) == response.choices[0].text
        streamed = [x for c in chunks for x in c.choices[0].logprobs.token_logprobs]
        assert streamed == pytest.approx(want_lps, abs=TOL)


def test_chat_equals_reference(client, reference):
    model, tokenizer = reference
    messages = [{"role": "user", "content": "What is two plus three?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want_ids, _ = greedy(model, tokenizer(text, add_special_tokens=False).input_ids, 10, True)
    response = client.chat.completions.create(model=SERVED_NAME, messages=messages,
                                              max_tokens=10, temperature=0,
                                              extra_body={"ignore_eos": True})
    assert response.choices[0].message.content == tokenizer.decode(want_ids,
                                                                   skip_special_tokens=True)


def test_lm_eval_loglikelihood_equals_hf_on_reference(server, checkpoint, reference, workdir,
                                                      monkeypatch):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    model_dir, _ = checkpoint
    tasks_dir = workdir / "tasks"
    tasks_dir.mkdir(exist_ok=True)
    manager = TaskManager(include_path=str(write_tasks(tasks_dir)))
    served = evaluate("local-completions", manager, ["tiny_mc"], model_args={
        "base_url": f"{server.base_url}/v1/completions", "model": SERVED_NAME,
        "tokenizer": str(model_dir), "tokenizer_backend": "huggingface", "batch_size": 4,
        "max_retries": 1})
    model, tokenizer = reference
    expected = evaluate(HFLM(pretrained=model, tokenizer=tokenizer, device="cpu",
                             batch_size=4), manager, ["tiny_mc"])
    for ours, theirs in zip(samples(served, "tiny_mc"), samples(expected, "tiny_mc"),
                            strict=True):
        assert [r[0] for r in ours["filtered_resps"]] == \
            pytest.approx([r[0] for r in theirs["filtered_resps"]], abs=TOL)
    assert served["results"]["tiny_mc"]["acc,none"] == expected["results"]["tiny_mc"]["acc,none"]


def test_malformed_requests_never_5xx(server):
    statuses = send_malformed(server.base_url)
    server_errors = [s for s in statuses if s[0] >= 500]
    assert not server_errors, server_errors
    assert sum(1 for s, _ in statuses if 400 <= s < 500) >= 190
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_disconnects_abort_and_do_not_leak(server):
    before = server.metric("talan_serve_requests_aborted_total", 'reason="client_disconnect"')
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for i in range(20):
        body = {"prompt": PROMPTS[i % 3], "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as c, \
                c.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    json.loads(line[6:])
                    break  # one event, then hang up
    wait_idle(server)
    after = server.metric("talan_serve_requests_aborted_total", 'reason="client_disconnect"')
    assert after - before == 20
