"""Tool calls read out of model text: whole and streamed (no engine)."""

from __future__ import annotations

import json

import pytest

from server.errors import APIError
from server.schemas import ChatCompletionRequest
from server.tools import StreamingToolParser, parse_tool_calls, parser_for, plan_tools
from talan_serve.testing import CHAT_TEMPLATE

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER, CLOCK], **fields})


def calls_of(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def stream(plan, text: str, step: int, parallel=None):
    parser = StreamingToolParser(plan, parallel)
    content, deltas = [], []
    for i in range(0, len(text), step):
        piece, calls = parser.feed(text[i:i + step])
        content.append(piece)
        deltas += calls
    piece, calls = parser.finish()
    return "".join(content) + piece, deltas + calls


HERMES_TEXT = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": '
               '"Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}'
               '\n</tool_call>')


def test_parsers_follow_the_chat_template():
    assert parser_for(CHAT_TEMPLATE) == "hermes"
    assert parser_for("{{ messages }}") is None  # renders no tools
    assert parser_for({"default": "x", "tool_use": "{% if tools %}<|python_tag|>{% endif %}"}) \
        == "llama3_json"


def test_auto_hermes_whole_and_streamed():
    plan = plan_tools(request(tool_choice="auto"), "hermes")
    content, calls = parse_tool_calls(plan, HERMES_TEXT)
    assert content == "Let me check."
    assert calls_of(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert parse_tool_calls(plan, HERMES_TEXT, parallel=False)[1][0]["function"]["name"] == \
        "get_weather"
    for step in (1, 3, 7, len(HERMES_TEXT)):
        streamed, deltas = stream(plan, HERMES_TEXT, step)
        assert streamed == "Let me check."
        assert [d["index"] for d in deltas] == [0, 1]
        assert calls_of(deltas) == calls_of(calls)
    # Held back: a partial "<tool" that turns out to be text comes out as text.
    assert stream(plan, "a <tool b", 1) == ("a <tool b", [])
    # A block that is not a call stays content.
    assert parse_tool_calls(plan, "<tool_call>nope</tool_call>") == \
        ("<tool_call>nope</tool_call>", [])


def test_auto_llama3_json():
    plan = plan_tools(request(), "llama3_json")  # tool_choice defaults to auto
    text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    assert calls_of(parse_tool_calls(plan, text)[1]) == [("get_weather", {"city": "Oslo"})]
    assert calls_of(stream(plan, text, 4)[1]) == [("get_weather", {"city": "Oslo"})]
    assert stream(plan, "It is sunny.", 3) == ("It is sunny.", [])
    assert parse_tool_calls(plan, "It is sunny.") == ("It is sunny.", [])


def test_named_function_is_forced_and_streams_its_arguments():
    plan = plan_tools(request(tool_choice={"type": "function",
                                           "function": {"name": "get_weather"}}), "hermes")
    assert plan.constraint.kind == "json"
    assert plan.constraint.value == WEATHER["function"]["parameters"]
    content, calls = parse_tool_calls(plan, '{"city": "Rome"}')
    assert content is None and calls_of(calls) == [("get_weather", {"city": "Rome"})]
    content, deltas = stream(plan, '{"city": "Rome"}', 5)
    assert content == "" and deltas[0]["function"]["name"] == "get_weather"
    assert "".join(d["function"]["arguments"] for d in deltas) == '{"city": "Rome"}'
    assert {d["index"] for d in deltas} == {0} and "id" in deltas[0] and "id" not in deltas[1]


def test_required_is_a_json_list_of_calls():
    plan = plan_tools(request(tool_choice="required", parallel_tool_calls=False), None)
    schema = plan.constraint.value
    assert schema["maxItems"] == 1 and schema["minItems"] == 1
    assert [s["properties"]["name"]["enum"] for s in schema["items"]["anyOf"]] == \
        [["get_weather"], ["get_time"]]
    assert schema["items"]["anyOf"][1]["properties"]["parameters"]["type"] == "object"
    text = '[{"name": "get_time", "parameters": {}}]'
    assert calls_of(parse_tool_calls(plan, text)[1]) == [("get_time", {})]
    assert calls_of(stream(plan, text, 2)[1]) == [("get_time", {})]


@pytest.mark.parametrize(("fields", "param"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "auto"}, "tools"),  # with a template that renders no tools
])
def test_tool_requests_that_cannot_be_honoured(fields, param):
    with pytest.raises(APIError) as error:
        plan_tools(request(**fields), None)
    assert error.value.status == 400 and error.value.param == param
    no_tools = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"})
    with pytest.raises(APIError, match="tool_choice needs tools"):
        plan_tools(no_tools, "hermes")
