"""The Responses API's bodies (``POST /v1/responses``), as OpenAI and vLLM's server define
them: what a request may carry, what is refused by name, and the response object.

A request is served as a chat completion (``server.responses``): input items become chat
messages, ``text.format`` the output constraint, function tools chat tools. Fields that
this server cannot honour are in ``REFUSED_RESPONSES`` (a 400 naming the field unless it
carries its harmless default); ``tests/server/test_schemas.py`` keeps them in step with
vLLM's ``ResponsesRequest``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, StrictBool, StrictInt, StrictStr, Tag

from server.schemas import (
    FunctionDefinition,
    JsonObject,
    ReasoningEffort,
    SamplingRequest,
    _Request,
)


class InputText(_Request):
    """A text part of an input message (the model's own earlier text is ``output_text``)."""

    type: Literal["input_text", "output_text", "text"]
    text: StrictStr


class InputMessage(_Request):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: StrictStr | Annotated[list[InputText], Field(min_length=1)]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionCallItem(_Request):
    """A call the model made earlier, sent back with the conversation."""

    type: Literal["function_call"]
    call_id: StrictStr
    name: StrictStr
    arguments: StrictStr  # JSON text


class FunctionCallOutputItem(_Request):
    """A tool's answer to one of the model's calls."""

    type: Literal["function_call_output"]
    call_id: StrictStr
    output: StrictStr | Annotated[list[InputText], Field(min_length=1)]

    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "".join(part.text for part in self.output)


class ReasoningText(_Request):
    type: Literal["reasoning_text", "summary_text"]
    text: StrictStr


class ReasoningItem(_Request):
    """A reasoning model's earlier reasoning, sent back (it goes to the next assistant turn)."""

    type: Literal["reasoning"]
    content: list[ReasoningText] | None = None
    summary: list[ReasoningText] = []

    def text(self) -> str:
        return "".join(part.text for part in self.content or self.summary)


def _item_type(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if isinstance(kind, str) else "message"  # easy input messages omit it


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type),
]


class FunctionTool(FunctionDefinition):
    """A function the model may call (the Responses API's flat form: chat's function
    definition beside its ``type``)."""

    type: Literal["function"]


class NamedFunctionChoice(_Request):
    type: Literal["function"]
    name: StrictStr


class TextFormat(_Request):
    """``text.format``: plain text, any JSON object, or JSON valid against ``schema``."""

    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[StrictStr, Field(max_length=64)] = "response"
    description: StrictStr | None = None
    schema_: Annotated[JsonObject | None, Field(alias="schema")] = None
    strict: StrictBool | None = None


class TextConfig(_Request):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(_Request):
    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(SamplingRequest):
    input: StrictStr | Annotated[list[InputItem], Field(min_length=1, max_length=4096)]
    instructions: StrictStr | None = None
    max_output_tokens: Annotated[StrictInt, Field(ge=1, le=2**31 - 1)] | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    include_reasoning: StrictBool = True
    chat_template_kwargs: JsonObject | None = None
    metadata: Annotated[dict[str, StrictStr], Field(max_length=16)] | None = None

# Fields of OpenAI's Responses API or of vLLM's ResponsesRequest that this server does not
# honour: set to anything but the values listed (or null), a 400 names them. No response is
# stored, so ``store`` and ``previous_response_id`` are refused (send the conversation as
# input items instead).
REFUSED_RESPONSES: dict[str, tuple[Any, ...]] = {
    "store": (False,), "previous_response_id": (), "conversation": (), "background": (False,),
    "include": ([],), "max_tool_calls": (), "prompt": (), "prompt_cache_key": (),
    "prompt_cache_retention": (), "safety_identifier": (), "service_tier": ("auto", "default"),
    "top_logprobs": (0,), "truncation": ("disabled",), "stream_options": (),
    "watermarking": (), "session_id": (), "media_io_kwargs": (), "mm_processor_kwargs": (),
    "priority": (0,), "mm_payload": (), "return_mm_kwargs": (False,),
    "enable_response_messages": (False,), "previous_input_messages": (), "vllm_xargs": (),
    "kv_transfer_params": (), "ec_transfer_params": (), "n": (1,),
}
# Nested fields refused by name (``text.verbosity``, ``reasoning.summary``): what this
# server cannot do with them (no verbosity control, no reasoning summaries).
REFUSED_NESTED = (("text", "verbosity"), ("reasoning", "summary"),
                  ("reasoning", "generate_summary"))


# ---- the response object ---------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class OutputReasoning(BaseModel):
    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[ReasoningText] = []
    content: list[ReasoningText]
    status: Literal["in_progress", "completed", "incomplete"]


class ResponseUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, int] = {"cached_tokens": 0}
    output_tokens_details: dict[str, int] = {"reasoning_tokens": 0}


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    model: str
    output: list[OutputReasoning | OutputMessage | OutputFunctionCall]
    usage: ResponseUsage | None = None
    incomplete_details: dict[str, str] | None = None
    error: dict[str, Any] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[FunctionTool] = []
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    text: dict[str, Any] = {"format": {"type": "text"}}
    reasoning: dict[str, Any] | None = None
    metadata: dict[str, str] = {}
    previous_response_id: None = None
    store: bool = False
    truncation: Literal["disabled"] = "disabled"
    user: str | None = None
