"""The request fields beyond the basics, against a live server: honoured with vLLM's
meaning (equal to vLLM's offline engine given the same parameters), or refused by name."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from tests.server.support import SERVED_NAME, engine_run

pytestmark = pytest.mark.slow
REPEAT = "the water the water the water the water the water the water"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["color", "ok"],
          "properties": {"color": {"enum": ["red", "green", "blue"]},
                         "ok": {"type": "boolean"}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["unit"],
        "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}}}}}


def greedy(client, prompt, **extra):
    response = client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=16,
                                         temperature=0, logprobs=0, extra_body=extra)
    return response.choices[0]


@pytest.mark.parametrize("penalty", [{"presence_penalty": 1.5}, {"frequency_penalty": 1.5},
                                     {"repetition_penalty": 1.8}])
def test_penalties_change_greedy_output_as_vllm_does(client, reference, tokenizer, penalty):
    ids = tokenizer(REPEAT).input_ids
    plain = greedy(client, ids)
    penalised = greedy(client, ids, **penalty)
    assert penalised.text != plain.text
    out = engine_run(reference, ids, max_tokens=16, temperature=0, logprobs=0, **penalty)
    expected = out.outputs[0]
    assert penalised.logprobs.tokens == [lp[t].decoded_token for t, lp in
                                         zip(expected.token_ids, expected.logprobs, strict=True)]


def test_logit_bias_forces_and_forbids_a_token(client, tokenizer):
    ids = tokenizer(REPEAT).input_ids
    plain = greedy(client, ids)
    first = plain.logprobs.tokens[0]
    forced_id = tokenizer(" apples", add_special_tokens=False).input_ids[0]
    forced = greedy(client, ids, logit_bias={str(forced_id): 100})
    assert set(forced.logprobs.tokens) == {tokenizer.decode([forced_id])}
    first_id = tokenizer(first, add_special_tokens=False).input_ids[0]
    forbidden = greedy(client, ids, logit_bias={str(first_id): -100})
    assert forbidden.logprobs.tokens[0] != first
    assert first not in forbidden.logprobs.tokens


def test_json_schema_output_validates(client):
    messages = [{"role": "user", "content": "Pick a color."}]
    for stream in (False, True):
        kwargs = dict(model=SERVED_NAME, messages=messages, max_tokens=60, temperature=0,
                      response_format={"type": "json_schema",
                                       "json_schema": {"name": "pick", "schema": SCHEMA}})
        if stream:
            chunks = client.chat.completions.create(stream=True, **kwargs)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            text = client.chat.completions.create(**kwargs).choices[0].message.content
        jsonschema.validate(json.loads(text), SCHEMA)
    obj = client.completions.create(model=SERVED_NAME, prompt="x", max_tokens=60,
                                    temperature=0,
                                    extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert obj.choices[0].text in ("yes", "no")


def test_named_tool_choice_returns_a_tool_call(client):
    kwargs = dict(model=SERVED_NAME, max_tokens=60, temperature=0, tools=[WEATHER],
                  messages=[{"role": "user", "content": "Weather in Paris?"}],
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    message = client.chat.completions.create(**kwargs).choices[0].message
    (call,) = message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert json.loads(arguments) == json.loads(call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "stop"  # a named call, as OpenAI's API
    # The call and its result go back into the conversation.
    follow_up = kwargs["messages"] + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"}]
    again = client.chat.completions.create(model=SERVED_NAME, messages=follow_up, max_tokens=8,
                                           temperature=0)
    assert again.choices[0].message.tool_calls in (None, [])
    assert again.usage.prompt_tokens > 0


def test_unsupported_fields_are_refused_by_name(server):
    with server.client() as c:
        for path, body in (("/v1/completions", {"prompt": "a", "suffix": "b"}),
                           ("/v1/completions", {"prompt": "a", "best_of": 3}),
                           ("/v1/chat/completions", {"messages": [{"role": "user",
                                                                   "content": "a"}],
                                                     "reasoning_effort": "high"})):
            response = c.post(path, json=body)
            assert response.status_code == 400
            error = response.json()["error"]
            field = next(k for k in body if k not in ("prompt", "messages"))
            assert error["param"] == field and field in error["message"]


def test_tokenize_detokenize_version(server, tokenizer):
    with server.client() as c:
        tokens = c.post("/tokenize", json={"prompt": REPEAT}).json()
        assert tokens["tokens"] == tokenizer(REPEAT).input_ids
        assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 512
        back = c.post("/detokenize", json={"tokens": tokens["tokens"]}).json()
        assert back == {"prompt": tokenizer.decode(tokens["tokens"])}
        messages = [{"role": "user", "content": "hi"}]
        chat = c.post("/tokenize", json={"messages": messages}).json()
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
        assert chat["tokens"] == tokenizer(text, add_special_tokens=False).input_ids
        assert c.post("/detokenize", json={"tokens": [10**6]}).status_code == 400
        version = c.get("/version").json()
    assert version["engine"] == "vllm" and version["version"]
    assert httpx.post(f"{server.base_url}/tokenize", json={"prompt": "a"}).status_code == 401
    assert httpx.get(f"{server.base_url}/openapi.json").json()["paths"]["/tokenize"]


def test_tokens_as_token_ids(client, tokenizer):
    """``return_tokens_as_token_ids``: the same logprobs, each token named by its id."""
    ids = tokenizer(REPEAT).input_ids
    plain = greedy(client, ids)
    named = greedy(client, ids, return_tokens_as_token_ids=True)
    token_ids = [int(t.removeprefix("token_id:")) for t in named.logprobs.tokens]
    assert all(t.startswith("token_id:") for t in named.logprobs.tokens)
    assert tokenizer.decode(token_ids) == plain.text == named.text
    assert named.logprobs.token_logprobs == plain.logprobs.token_logprobs
    chat = client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=2,
        extra_body={"return_tokens_as_token_ids": True})
    entries = chat.choices[0].logprobs.content
    assert tokenizer.decode([int(e.token.removeprefix("token_id:")) for e in entries]) == \
        chat.choices[0].message.content
    assert all(t.token.startswith("token_id:") for e in entries for t in e.top_logprobs)
