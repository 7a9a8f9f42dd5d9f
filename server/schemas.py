"""OpenAI-compatible request and response bodies (pydantic).

Requests are validated here (types and ranges); limits that depend on the model
(context length, vocabulary) are checked in ``server.prompts`` and ``server.sampling``.
Every field that vLLM's OpenAI server accepts is either a field below, honoured with the
same meaning, or in ``REFUSED`` (a 400 that names it unless it carries its harmless
default). Other unknown fields are ignored, as OpenAI clients send many.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    WithJsonSchema,
)

from talan_serve.switch import SwitchError, parse_switch

# JSON numbers that Python would accept but no engine should see (NaN, inf, 2**100).
Int64 = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
TokenId = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP = 16
MAX_BATCH = 256


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _check_switch(value: Any) -> Any:
    parse_switch(value)  # the one parser the engine plugins use (a SwitchError is a 400)
    if isinstance(value, dict) and "adapter" in value:
        # The engine-side field; over HTTP the ``model`` field chooses the adapter.
        raise SwitchError('"talan.adapter" is not a request field: name the adapter in "model"')
    return value


# The per-request TALAN switch, ``{"enabled": false}``; read with talan_serve.switch.
TalanSwitch = Annotated[
    Any,
    AfterValidator(_check_switch),
    WithJsonSchema({"anyOf": [{"type": "object", "additionalProperties": False,
                               "properties": {"enabled": {"type": "boolean"}}},
                              {"type": "null"}]}),
]


class StreamOptions(_Request):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]
JsonObject = dict[str, Any]


class JsonSchemaFormat(_Request):
    name: Annotated[StrictStr, Field(max_length=64)] = "response"
    description: StrictStr | None = None
    schema_: Annotated[JsonObject | None, Field(alias="schema")] = None
    strict: StrictBool | None = None


class ResponseFormat(_Request):
    """``text``, ``json_object`` (any JSON object) or ``json_schema`` (JSON valid against it)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Request):
    """vLLM's own constraint field: exactly one of ``json``, ``regex``, ``choice``, ``grammar``."""

    model_config = ConfigDict(extra="forbid")
    json_: Annotated[JsonObject | StrictStr | None, Field(alias="json")] = None
    regex: StrictStr | None = None
    choice: Annotated[list[StrictStr], Field(min_length=1)] | None = None
    grammar: StrictStr | None = None
    json_object: StrictBool | None = None


class SamplingRequest(_Request):
    """What every generating endpoint takes (completions, chat, the Responses API): the
    model, how to sample, where to stop, an output constraint, the TALAN switch."""

    model: StrictStr | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[StrictInt, Field(ge=-1, le=2**31 - 1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0, allow_inf_nan=False)] | None = None
    logit_bias: Annotated[dict[str, Bias], Field(max_length=1024)] | None = None
    seed: Int64 | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP)] | None = None
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    structured_outputs: StructuredOutputs | None = None
    cache_salt: Annotated[StrictStr, Field(min_length=1)] | None = None
    request_id: Annotated[StrictStr, Field(min_length=1, max_length=128)] | None = None
    user: StrictStr | None = None
    talan: TalanSwitch = None


class _SamplingFields(SamplingRequest):
    """What completions and chat take beyond the Responses API."""

    min_tokens: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)] | None = None
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1)] | None = None
    bad_words: Annotated[list[Annotated[StrictStr, Field(min_length=1)]],
                         Field(max_length=MAX_STOP)] | None = None
    spaces_between_special_tokens: StrictBool = True
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    truncate_prompt_tokens: Annotated[StrictInt, Field(ge=-1, le=2**31 - 1)] | None = None
    truncation_side: Literal["left", "right"] | None = None
    # Logprob tokens as "token_id:ID" (vLLM's field): exact ids where text is ambiguous.
    return_tokens_as_token_ids: StrictBool = False

Prompt = (
    StrictStr
    | Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_BATCH)]
    | Annotated[list[TokenId], Field(min_length=1)]
    | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]],
                Field(min_length=1, max_length=MAX_BATCH)]
)


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    max_tokens: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)] | None = 16
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: StrictBool = False
    add_special_tokens: StrictBool = True


class TextPart(_Request):
    type: Literal["text"]
    text: StrictStr


class FunctionCall(_Request):
    name: StrictStr
    arguments: StrictStr  # JSON text, as OpenAI sends it


class ToolCall(_Request):
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | Annotated[list[TextPart], Field(min_length=1)] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: StrictStr | None = None  # a tool turn: which call it answers
    # An assistant turn's reasoning, sent back (vLLM's name, and the older one that
    # DeepSeek's API and SGLang use); chat templates read it as ``reasoning_content``.
    reasoning: StrictStr | None = None
    reasoning_content: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDefinition(_Request):
    name: Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: StrictStr | None = None
    parameters: JsonObject | None = None
    strict: StrictBool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: StrictStr


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=4096)]
    max_tokens: Annotated[StrictInt, Field(ge=1, le=2**31 - 1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=2**31 - 1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    add_special_tokens: StrictBool = False
    chat_template_kwargs: JsonObject | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    # Reasoning models (with a reasoning parser): how hard to think, passed to the chat
    # template (with enable_thinking off for "none", as vLLM does), and whether the answer
    # carries the reasoning.
    reasoning_effort: ReasoningEffort | None = None
    include_reasoning: StrictBool = True


# Fields of vLLM's OpenAI server (0.32/0.33) or of OpenAI's API that this server does not
# honour: a request that sets one to anything but the values listed (or null) gets a 400
# naming it. tests/server/test_schemas.py keeps this in step with vLLM's request models.
_BOTH_REFUSED: dict[str, tuple[Any, ...]] = {
    "use_beam_search": (False,), "length_penalty": (1, 1.0), "best_of": (1,),
    "prompt_logprobs": (), "logprob_token_ids": (), "priority": (0,), "session_id": (),
    "return_token_ids": (False,),
    "routed_experts_prompt_start": (), "return_token_offsets": (False,), "mm_payload": (),
    "return_mm_kwargs": (False,), "kv_transfer_params": (), "ec_transfer_params": (),
    "vllm_xargs": (), "repetition_detection": (), "thinking_token_budget": (),
    "stream_interval": (1,), "watermarking": (), "guided_json": (), "guided_regex": (),
    "guided_choice": (), "guided_grammar": (), "store": (False,), "prediction": (),
    "modalities": (["text"],), "audio": (), "web_search_options": (), "service_tier": (),
}
REFUSED: dict[str, dict[str, tuple[Any, ...]]] = {
    "completions": {**_BOTH_REFUSED, "suffix": ("",), "prompt_embeds": ()},
    "chat": {**_BOTH_REFUSED, "echo": (False,), "documents": (), "chat_template": (),
             "media_io_kwargs": (), "mm_processor_kwargs": (), "return_prompt_text": (False,),
             "functions": (), "function_call": ()},
}


# ---- responses -------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    # A reasoning model's reasoning, split from content by the reasoning parser: under
    # vLLM's name and under the name DeepSeek's API and SGLang use.
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ResponseToolCall] = []


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "talan-serve"
    max_model_len: int
    talan: bool | None  # None: an adapter of --adapter-dir whose manifest is unreadable
    dtype: str
    # How the model's LoRA is served (a wire name kept for clients: "adapter" here is the
    # PEFT adapter, docs/design.md "Glossary").
    adapter: Literal["merged", "per_request"] | None
    deterministic: bool  # --deterministic: outputs independent of other requests in flight
    root: str | None = None  # as vLLM: the model's name, or an adapter's checkpoint path
    parent: str | None = None  # an adapter's base model
    # Whether the model is in the engine now (an adapter of --adapter-dir is loaded on its
    # first request), and whether it stays there (pinned: given at start or loaded
    # explicitly; never evicted).
    loaded: bool = True
    pinned: bool | None = None


class LoadAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's fields): a checkpoint served as ``lora_name``."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_path: str


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- tokenizer endpoints (as vLLM's server has them) ------------------------------------


class TokenizeRequest(_Request):
    """``/tokenize`` of a prompt; a body with ``messages`` is a ``ChatCompletionRequest``
    tokenized through the chat template instead."""

    model: StrictStr | None = None
    prompt: StrictStr
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: StrictStr | None = None
    tokens: Annotated[list[TokenId], Field(max_length=1_000_000)]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
    engine: str
    engine_version: str
