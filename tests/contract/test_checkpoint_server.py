"""One TALAN(+LoRA) checkpoint served by ``talan-serve --engine E`` equals the reference.

A server per engine on a tiny Qwen3 + TALAN + LoRA checkpoint (fp32, ``--deterministic``,
the LoRA merged into the weights at load, the default), and a second with the LoRA served
per request (``--no-merge-lora``). Against the transformers reference
(``talan_serve.reference.load_reference``: HF + PEFT + TALAN, full-sequence forward): the
OpenAI SDK's greedy completions, streamed and not, equal it (ids, logprobs within 1e-4)
with TALAN on and off; so do chat (and the Responses API, which gives chat's text), echoed
prompt logprobs and lm-eval's loglikelihood through the server (against its ``hf`` backend
on the reference). Malformed requests get no 5xx; abandoned streams are aborted in the
engine.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from tests.contract.conftest import serve
from tests.contract.support import TOL, greedy
from tests.server.support import (
    API_KEY,
    SERVED_NAME,
    evaluate,
    samples,
    send_malformed,
    wait_idle,
    write_tasks,
)

pytestmark = pytest.mark.slow
PROMPTS = ["the water call first who", "Solve 12 plus 7 equals", "a"]


@pytest.fixture(scope="module")
def checkpoint(tiny_model, workdir):
    from talan_serve.testing import build_tiny_checkpoint

    model_dir = tiny_model("qwen3")
    return model_dir, build_tiny_checkpoint(model_dir, workdir / "checkpoint")


@pytest.fixture(scope="module")
def server(engine, checkpoint, workdir):
    model_dir, ckpt = checkpoint
    proc = serve(engine, model_dir, workdir, "--talan", str(ckpt), "--deterministic")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


@pytest.fixture(scope="module")
def unmerged_client(engine, checkpoint, workdir):
    model_dir, ckpt = checkpoint
    proc = serve(engine, model_dir, workdir, "--talan", str(ckpt), "--no-merge-lora")
    with proc.client() as c:
        assert c.get("/v1/models").json()["data"][0]["adapter"] == "per_request"
    yield proc.openai()
    proc.stop()


@pytest.fixture(scope="module")
def reference(checkpoint):
    from talan_serve.reference import load_reference

    model_dir, ckpt = checkpoint
    return load_reference(model_dir, talan=ckpt)


def test_models_say_what_is_served(server, engine):
    with server.client() as c:
        (card,) = c.get("/v1/models").json()["data"]
        version = c.get("/version").json()
    assert (card["talan"], card["adapter"], card["dtype"], card["deterministic"]) == \
        (True, "merged", "float32", True)
    assert version["engine"] == engine


def assert_greedy_equals_reference(client, reference, talan: bool, stream: bool) -> None:
    model, tokenizer = reference
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        want_ids, want_lps = greedy(model, ids, 8, talan)
        kwargs = dict(model=SERVED_NAME, prompt=ids, max_tokens=8, temperature=0, logprobs=0,
                      extra_body={"ignore_eos": True, "talan": {"enabled": talan}})
        response = client.completions.create(**kwargs)
        got = response.choices[0].logprobs
        # Same tokens: the same text (a full decode, server/backends/template.py) and the
        # same logprob at every step (a different token would not match within TOL).
        assert response.choices[0].text == tokenizer.decode(want_ids, skip_special_tokens=True)
        assert len(got.tokens) == len(want_ids)
        assert got.token_logprobs == pytest.approx(want_lps, abs=TOL)
        if stream:
            chunks = list(client.completions.create(stream=True, **kwargs))
            assert "".join(c.choices[0].text for c in chunks) == response.choices[0].text
            streamed = [x for c in chunks for x in c.choices[0].logprobs.token_logprobs]
            assert streamed == pytest.approx(want_lps, abs=TOL)


@pytest.mark.parametrize("talan", [True, False])
def test_greedy_completion_equals_reference(client, reference, talan):
    assert_greedy_equals_reference(client, reference, talan, stream=True)


@pytest.mark.parametrize("talan", [True, False])
def test_lora_served_per_request_equals_reference(unmerged_client, reference, talan):
    assert_greedy_equals_reference(unmerged_client, reference, talan, stream=False)


def test_switch_changes_the_output(client):
    def run(enabled: bool) -> list[float]:
        response = client.completions.create(
            model=SERVED_NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=0,
            extra_body={"ignore_eos": True, "talan": {"enabled": enabled}})
        return response.choices[0].logprobs.token_logprobs

    on, off = run(True), run(False)
    assert max(abs(a - b) for a, b in zip(on, off, strict=True)) > 1e-3


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


def test_responses_equal_chat(client):
    """POST /v1/responses serves the chat completion's text, whole and streamed, with
    TALAN on and off (the ``talan`` field as in the other endpoints)."""
    question = "What is two plus three?"
    for enabled in (True, False):
        extra = {"ignore_eos": True, "talan": {"enabled": enabled}}
        chat = client.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": question}], max_tokens=10,
            temperature=0, extra_body=extra).choices[0].message.content
        kwargs = dict(model=SERVED_NAME, input=question, max_output_tokens=10, temperature=0,
                      extra_body=extra)
        response = client.responses.create(**kwargs)
        assert response.output_text == chat and response.usage.output_tokens == 10
        with client.responses.stream(**kwargs) as stream:
            events = list(stream)
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") \
            == chat
        assert events[-1].type == "response.completed"


def test_echo_logprobs_equal_reference_forward(client, reference):
    model, tokenizer = reference
    ids = tokenizer(PROMPTS[1]).input_ids
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    want = [float(logprobs[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    response = client.completions.create(model=SERVED_NAME, prompt=ids, echo=True, max_tokens=0,
                                         logprobs=1, temperature=0)
    assert response.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want, abs=TOL)


def test_lm_eval_loglikelihood_equals_hf_on_reference(server, checkpoint, reference, workdir,
                                                      monkeypatch):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    model_dir, _ = checkpoint
    tasks_dir = workdir / "tasks"
    tasks_dir.mkdir(exist_ok=True)
    manager = TaskManager(include_path=str(write_tasks(tasks_dir)))
    served = evaluate(
        "local-completions", manager, ["tiny_mc"],
        model_args={"base_url": f"{server.base_url}/v1/completions", "model": SERVED_NAME,
                    "tokenizer": str(model_dir), "tokenizer_backend": "huggingface",
                    "batch_size": 4, "max_retries": 1},
    )
    model, tokenizer = reference
    hf = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=4)
    expected = evaluate(hf, manager, ["tiny_mc"])
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
