"""Request fields: every one of vLLM's is honoured or refused by name; clear union errors;
request fields to the engine's sampling parameters; the OpenAPI document (no engine)."""

from __future__ import annotations

import pytest

from server.backends.base import ModelInfo
from server.errors import APIError
from server.http import parse
from server.responses import parse_responses
from server.responses_schemas import REFUSED_RESPONSES, ResponsesRequest
from server.sampling import sampling_options
from server.schemas import REFUSED, ChatCompletionRequest, CompletionRequest

INFO = ModelInfo("m", 512, None, 100, False, "float32")
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def field_names(model) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()}


@pytest.mark.parametrize(("theirs", "ours", "endpoint"), [
    ("vllm.entrypoints.openai.completion.protocol:CompletionRequest", CompletionRequest,
     "completions"),
    ("vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest",
     ChatCompletionRequest, "chat"),
])
def test_every_vllm_field_is_honoured_or_refused(theirs, ours, endpoint):
    """Fails when a vLLM upgrade adds a request field that this server has not decided on."""
    import importlib

    module, name = theirs.split(":")
    vllm_fields = set(getattr(importlib.import_module(module), name).model_fields)
    undecided = vllm_fields - field_names(ours) - set(REFUSED[endpoint])
    assert not undecided
    assert not field_names(ours) & set(REFUSED[endpoint])


def test_every_vllm_responses_field_is_honoured_or_refused():
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest as Theirs

    undecided = set(Theirs.model_fields) - field_names(ResponsesRequest) - set(REFUSED_RESPONSES)
    assert not undecided
    assert not field_names(ResponsesRequest) & set(REFUSED_RESPONSES)


def test_responses_refusals_name_the_field():
    for field, value in (("store", True), ("previous_response_id", "resp_1"),
                         ("background", True), ("n", 2)):
        with pytest.raises(APIError) as error:
            parse_responses({"input": "a", field: value}, REFUSED_RESPONSES)
        assert (error.value.status, error.value.param) == (400, field)
    for field, value in (("store", False), ("background", False), ("truncation", "disabled"),
                         ("include", []), ("n", 1)):
        parse_responses({"input": "a", field: value}, REFUSED_RESPONSES)
    with pytest.raises(APIError) as error:
        parse_responses({"input": "a", "text": {"verbosity": "low"}}, REFUSED_RESPONSES)
    assert error.value.param == "text.verbosity"


def bad(body, model=CompletionRequest, endpoint="completions") -> APIError:
    with pytest.raises(APIError) as error:
        parse(model, body, REFUSED[endpoint])
    assert error.value.status == 400
    return error.value


def test_refused_fields_are_named_unless_harmless():
    for field, value in (("suffix", "x"), ("use_beam_search", True), ("best_of", 2),
                         ("best_of", True), ("prompt_logprobs", 1), ("priority", 3)):
        error = bad({"prompt": "a", field: value})
        assert (error.param, error.code) == (field, "unsupported_parameter")
        assert f"'{field}' is not supported" in error.message
    for field, value in (("best_of", 1), ("use_beam_search", False), ("length_penalty", 1),
                         ("suffix", None), ("stream_interval", 1)):
        parse(CompletionRequest, {"prompt": "a", field: value}, REFUSED["completions"])
    for field in ("chat_template", "documents", "functions", "function_call"):
        error = bad({**CHAT, field: "x"}, ChatCompletionRequest, "chat")
        assert error.param == field


def test_union_errors_name_the_limit():
    error = bad({"prompt": ["a"] * 5000})
    assert error.param == "prompt" and "at most 256 items" in error.message and "5000" in \
        error.message
    assert "at most 16 items" in bad({"prompt": "a", "stop": ["x"] * 100}).message
    assert "'prompt.1.1'" in bad({"prompt": [[1, 2], [3, -1]]}).message


def options(body, model=CompletionRequest, endpoint="completions", max_tokens=16):
    return sampling_options(parse(model, body, REFUSED[endpoint]), INFO, max_tokens, None)


def test_sampling_fields_reach_the_engine_options():
    from server.backends.vllm import sampling_params

    got = options({"prompt": "a", "presence_penalty": 0.5, "frequency_penalty": -0.5,
                   "repetition_penalty": 1.3, "min_p": 0.1, "min_tokens": 3,
                   "logit_bias": {"7": 100, "8": -100}, "allowed_token_ids": [1, 7, 8],
                   "bad_words": ["x y"], "include_stop_str_in_output": True,
                   "skip_special_tokens": False})
    params = sampling_params(got)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty,
            params.min_p, params.min_tokens) == (0.5, -0.5, 1.3, 0.1, 3)
    assert params.logit_bias == {7: 100.0, 8: -100.0}
    assert params.allowed_token_ids == [1, 7, 8] and params.bad_words == ["x y"]
    assert params.include_stop_str_in_output and not params.skip_special_tokens
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    for fmt, kind in (({"type": "json_object"}, "json_object"),
                      ({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
                       "json")):
        params = sampling_params(options({"prompt": "a", "response_format": fmt}))
        assert getattr(params.structured_outputs, kind) in (True, schema)
    params = sampling_params(options({"prompt": "a", "structured_outputs": {"regex": "a+"}}))
    assert params.structured_outputs.regex == "a+"
    assert sampling_params(options({"prompt": "a", "response_format": {"type": "text"}})) \
        .structured_outputs is None


@pytest.mark.parametrize(("body", "param"), [
    ({"logit_bias": {"100": 1}}, "logit_bias"), ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"allowed_token_ids": [100]}, "allowed_token_ids"), ({"min_tokens": 17}, "min_tokens"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "structured_outputs"),
])
def test_sampling_fields_that_cannot_be_honoured(body, param):
    with pytest.raises(APIError) as error:
        options({"prompt": "a", **body})
    assert error.value.status == 400 and error.value.param == param


def test_openapi_describes_every_request_body():
    from server.app import create_app

    class Backend:
        info = INFO

        def num_unfinished(self) -> int:
            return 0

    schema = create_app(Backend()).openapi()
    components = schema["components"]["schemas"]
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize",
                 "/detokenize"):
        ref = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"][
            "schema"]["$ref"]
        assert components[ref.rsplit("/", 1)[1]]["properties"]
    chat = components["ChatCompletionRequest"]["properties"]
    assert {"tools", "tool_choice", "response_format", "logit_bias", "talan"} <= set(chat)
    assert schema["paths"]["/v1/models"]["get"]["responses"]["200"]
