"""Tool calls read out of model text, whole and streamed: forced calls by this server, and
``auto`` by vLLM's own parsers as talan-serve composes them (no engine)."""

from __future__ import annotations

import json

import pytest

from server.backends.vllm_parsers import VllmParsers
from server.errors import APIError
from server.outputs import OutputReader
from server.parsing import (
    REASONING,
    TOOLS,
    ParserChoiceError,
    ParseRequest,
    merge_tool_deltas,
    resolve_parser,
)
from server.schemas import ChatCompletionRequest
from server.tools import StreamingToolParser, parse_tool_calls, plan_tools
from talan_serve.testing import CHAT_TEMPLATE, QWEN3_CHAT_TEMPLATE

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


def stream(plan, text: str, step: int):
    parser = StreamingToolParser(plan)
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
    registry = VllmParsers()
    assert resolve_parser(TOOLS, "auto", CHAT_TEMPLATE, registry) == "hermes"
    assert resolve_parser(TOOLS, "auto", "{{ messages }}", registry) is None  # no tools
    assert resolve_parser(TOOLS, "auto", {"default": "x", "tool_use":
                                          "{% if tools %}<|python_tag|>{% endif %}"},
                          registry) == "llama3_json"
    assert resolve_parser(REASONING, "auto", QWEN3_CHAT_TEMPLATE, registry) == "qwen3"
    assert resolve_parser(REASONING, "auto", CHAT_TEMPLATE, registry) is None
    assert resolve_parser(TOOLS, "none", CHAT_TEMPLATE, registry) is None
    assert resolve_parser(TOOLS, "mistral", None, registry) == "mistral"
    with pytest.raises(ParserChoiceError, match="--tool-call-parser nope: not in the engine"):
        resolve_parser(TOOLS, "nope", None, registry)


def engine_parse(tokenizer, parser: str, text: str, step: int | None = None):
    """``text`` through vLLM's ``parser`` as talan-serve runs it: whole, or streamed
    ``step`` tokens at a time (deltas merged as a client does)."""
    plan = plan_tools(request(tool_choice="auto"), parser)
    parse_request = ParseRequest(None, parser, plan.tools, [{"role": "user", "content": "hi"}],
                                 {}, [1, 2], auto_tools=True)
    reader = OutputReader(VllmParsers().make(parse_request, tokenizer), plan, None, True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if step is None:
        parsed = reader.whole(text, ids)
        return parsed.content, parsed.tool_calls
    content, deltas, sent = [], [], ""
    for i in range(0, len(ids), step):
        now = tokenizer.decode(ids[:i + step])
        parsed = reader.delta(now[len(sent):], ids[i:i + step], i + step >= len(ids))
        sent = now
        if parsed is not None:
            content.append(parsed.content or "")
            deltas += parsed.tool_calls
    return "".join(content), merge_tool_deltas(deltas)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model("llama"))


def test_auto_hermes_whole_and_streamed(tokenizer):
    content, calls = engine_parse(tokenizer, "hermes", HERMES_TEXT)
    assert content.strip() == "Let me check."
    assert calls_of(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert all(c["id"] and c["type"] == "function" for c in calls)
    for step in (1, 3):
        streamed, deltas = engine_parse(tokenizer, "hermes", HERMES_TEXT, step)
        assert streamed.strip() == "Let me check."
        assert calls_of(deltas) == calls_of(calls)
    assert engine_parse(tokenizer, "hermes", "It is sunny.") == ("It is sunny.", [])


def test_a_parser_that_cannot_read_the_tokenizer_is_refused_at_start(tokenizer):
    from types import SimpleNamespace

    from server.backends.template import UsageError
    from server.backends.vllm import VllmBackend

    # llama3_json needs <|python_tag|> in the vocabulary, which this tokenizer lacks.
    backend = SimpleNamespace(reasoning_parser=None, tool_parser="llama3_json",
                              parsers=VllmParsers)
    with pytest.raises(UsageError, match="--tool-call-parser llama3_json cannot read"):
        VllmBackend.check_parsers_build(backend, tokenizer)
    backend.tool_parser = "hermes"
    VllmBackend.check_parsers_build(backend, tokenizer)


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
