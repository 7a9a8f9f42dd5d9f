"""OpenAI-compatible request and response bodies (pydantic).

Requests are validated here (types and ranges); limits that depend on the model
(context length, vocabulary) are checked in ``server.prompts``. Unknown fields are
ignored, as OpenAI clients send fields this server does not implement.
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

from talan_serve.switch import parse_switch

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


class _SamplingFields(_Request):
    model: StrictStr | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[StrictInt, Field(ge=-1, le=2**31 - 1)] | None = None
    seed: Int64 | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False
    user: StrictStr | None = None
    talan: TalanSwitch = None


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


class TextPart(_Request):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | Annotated[list[TextPart], Field(min_length=1)] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=4096)]
    max_tokens: Annotated[StrictInt, Field(ge=1, le=2**31 - 1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=2**31 - 1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    add_generation_prompt: StrictBool = True


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


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


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
    talan: bool
    dtype: str
    adapter: Literal["merged", "per_request"] | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
