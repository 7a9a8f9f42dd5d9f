"""POST /v1/responses through OpenAI's SDK: the same text as chat completions for the same
greedy request, whole and streamed with the Responses event types; a tool call's round
trip as input items; ``text.format``; and what is refused by name."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.server.support import SERVED_NAME

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object",
                          "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
                          "required": ["city"], "additionalProperties": False}}
INSTRUCTIONS = "You answer briefly."
QUESTION = "Name the first color you think of"


def chat_text(client, messages, **extra):
    response = client.chat.completions.create(model=SERVED_NAME, messages=messages,
                                              temperature=0, **extra)
    return response.choices[0], response.usage


def test_create_and_stream_give_the_chat_text(client):
    choice, usage = chat_text(client, [{"role": "system", "content": INSTRUCTIONS},
                                       {"role": "user", "content": QUESTION}], max_tokens=12)
    assert choice.message.content and choice.finish_reason == "length"
    kwargs = dict(model=SERVED_NAME, input=QUESTION, instructions=INSTRUCTIONS,
                  max_output_tokens=12, temperature=0)
    response = client.responses.create(**kwargs)
    assert response.output_text == choice.message.content
    assert response.id.startswith("resp_") and response.model == SERVED_NAME
    # Cut short by max_output_tokens, as OpenAI's API reports it.
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert (response.usage.input_tokens, response.usage.output_tokens) == \
        (usage.prompt_tokens, usage.completion_tokens)
    (message,) = response.output
    assert message.type == "message" and message.content[0].type == "output_text"

    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") >= 2
    for done in ("response.output_item.added", "response.content_part.added",
                 "response.output_text.done", "response.content_part.done",
                 "response.output_item.done"):
        assert kinds.count(done) == 1, done
    assert [event.sequence_number for event in events] == list(range(len(events)))
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == choice.message.content == final.output_text
    assert final.status == "incomplete" and final.usage.output_tokens == 12


def test_message_items_equal_chat_messages(client):
    messages = [{"role": "user", "content": "hello there"},
                {"role": "assistant", "content": "hi, what do you need"},
                {"role": "user", "content": "a word about water"}]
    choice, _ = chat_text(client, messages, max_tokens=10)
    items = [{"role": "user", "content": [{"type": "input_text", "text": "hello there"}]},
             {"type": "message", "role": "assistant",
              "content": [{"type": "output_text", "text": "hi, what do you need"}]},
             {"type": "message", "role": "user", "content": "a word about water"}]
    response = client.responses.create(model=SERVED_NAME, input=items, max_output_tokens=10,
                                       temperature=0)
    assert response.output_text == choice.message.content


def test_a_tool_call_makes_the_round_trip(client):
    question = [{"role": "user", "content": "Weather in Paris?"}]
    kwargs = dict(model=SERVED_NAME, input=question, tools=[WEATHER], max_output_tokens=40,
                  temperature=0, tool_choice={"type": "function", "name": "get_weather"})
    response = client.responses.create(**kwargs)
    (call,) = response.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
    kinds = [event.type for event in events]
    assert "response.function_call_arguments.delta" in kinds
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert json.loads(done.arguments) == json.loads(call.arguments)
    # The call and the tool's output go back as input items: the prompt is the chat's.
    follow_up = [*question, {"type": "function_call", "call_id": call.call_id,
                             "name": call.name, "arguments": call.arguments},
                 {"type": "function_call_output", "call_id": call.call_id,
                  "output": "18 degrees"}]
    # (Without the tools: their description would overflow the tiny model's context.)
    again = client.responses.create(model=SERVED_NAME, input=follow_up, max_output_tokens=8,
                                    temperature=0)
    choice, usage = chat_text(
        client, [*question, {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}]},
                 {"role": "tool", "tool_call_id": call.call_id, "content": "18 degrees"}],
        max_tokens=8)
    assert again.output_text == choice.message.content
    assert again.usage.input_tokens == usage.prompt_tokens


def test_text_format_json_schema(client):
    schema = {"type": "object", "properties": {"color": {"type": "string",
                                                         "enum": ["red", "blue"]}},
              "required": ["color"], "additionalProperties": False}
    response = client.responses.create(
        model=SERVED_NAME, input="Pick a color.", max_output_tokens=30, temperature=0,
        text={"format": {"type": "json_schema", "name": "pick", "schema": schema}})
    jsonschema.validate(json.loads(response.output_text), schema)
    choice, _ = chat_text(client, [{"role": "user", "content": "Pick a color."}],
                          max_tokens=30, response_format={
                              "type": "json_schema",
                              "json_schema": {"name": "pick", "schema": schema}})
    assert response.output_text == choice.message.content
    assert response.text.format.type == "json_schema"


@pytest.mark.parametrize(("fields", "param"), [
    ({"store": True}, "store"),
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"background": True}, "background"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"text": {"verbosity": "low"}}, "text.verbosity"),
    ({"reasoning": {"summary": "auto"}}, "reasoning.summary"),
    # This model has no reasoning parser: there is no reasoning to direct.
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"input": []}, "input"),
])
def test_refused_by_name(server, fields, param):
    with server.client() as c:
        response = c.post("/v1/responses", json={"input": "hi", "max_output_tokens": 2,
                                                 **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param.split(".")[0] in error["message"]


def test_store_false_and_defaults_are_accepted(server):
    with server.client() as c:
        response = c.post("/v1/responses", json={"input": "hi", "max_output_tokens": 2,
                                                 "store": False, "truncation": "disabled",
                                                 "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "response" and body["store"] is False
    assert body["usage"]["output_tokens"] == 2


def test_each_streamed_event_is_named_as_its_type(server):
    """Every SSE event carries an ``event:`` line equal to its data's ``type``, as OpenAI's
    and vLLM's servers send them."""
    with server.client() as c, c.stream("POST", "/v1/responses", json={
            "input": "hi", "max_output_tokens": 3, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        blocks = [b for b in r.read().decode().split("\n\n") if b.strip()]
    names, events = [], []
    for block in blocks:
        event, data = block.split("\n")
        assert event.startswith("event: ") and data.startswith("data: "), block
        names.append(event[len("event: "):])
        events.append(json.loads(data[len("data: "):]))
    assert names == [e["type"] for e in events]
    assert names[0] == "response.created" and names[-1] == "response.completed"
    # The engine may hand over two tokens in one output when the reader lags, so the number
    # of deltas is not fixed; what they spell is.
    completed = events[-1]["response"]
    assert completed["usage"]["output_tokens"] == 3
    text = completed["output"][0]["content"][0]["text"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == text
