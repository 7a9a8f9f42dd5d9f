"""Tool calling in chat: what the model is told, how its output is constrained, and how
forced tool calls are read back out of its text (whole or streamed).

- ``tool_choice`` ``none``: the tools are rendered, nothing is parsed (as vLLM does).
- ``auto``: the tools are rendered with the model's chat template, and the output is read
  by the engine's own tool-call parser (``server.parsing``; ``--tool-call-parser``).
- ``required`` and a named function: constrained decoding makes the output a JSON list of
  ``{"name", "parameters"}`` calls, or the named function's arguments, as vLLM does; this
  module reads them back.

Engine-neutral: parsing is text in, OpenAI ``tool_calls`` out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from server.backends.base import Constraint
from server.errors import bad_request
from server.parsing import new_call_id
from server.schemas import ChatCompletionRequest, NamedToolChoice

_EMPTY_OBJECT = {"type": "object", "properties": {}}


def tool_call(name: str, arguments: Any, call_id: str | None = None) -> dict:
    """One OpenAI ``tool_calls`` entry; ``arguments`` as JSON text."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments,
                                                                   ensure_ascii=False)
    return {"id": call_id or new_call_id(), "type": "function",
            "function": {"name": name, "arguments": text}}


@dataclass
class ToolPlan:
    """How one chat request uses its tools."""

    mode: str  # "none" | "auto" | "required" | "named"
    tools: list[dict] = field(default_factory=list)  # as the chat template takes them
    parser: str | None = None  # auto: the engine's tool-call parser (registry name)
    function: str | None = None  # named: the function forced
    constraint: Constraint | None = None  # required / named: the output's shape

    @property
    def parses(self) -> bool:
        return self.mode in ("auto", "required", "named")

    @property
    def forced(self) -> bool:
        """A call is forced by constrained decoding (read by this module, not the engine's
        tool-call parser)."""
        return self.mode in ("required", "named")


def plan_tools(request: ChatCompletionRequest, parser: str | None) -> ToolPlan | None:
    """The request's tool plan (None without tools), or a 400 naming what cannot be done."""
    choice = request.tool_choice
    if not request.tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", param="tool_choice")
        return None
    tools = [tool.model_dump(exclude_none=True) for tool in request.tools]
    names = [tool.function.name for tool in request.tools]
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise bad_request(f"tool_choice names {choice.function.name!r}, which is not in "
                              "tools", param="tool_choice")
        params = request.tools[names.index(choice.function.name)].function.parameters
        return ToolPlan("named", tools, function=choice.function.name,
                        constraint=Constraint("json", params or _EMPTY_OBJECT))
    if choice == "required":
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {
            "type": "object", "anyOf": [
                {"properties": {"name": {"type": "string", "enum": [tool.function.name]},
                                "parameters": tool.function.parameters or _EMPTY_OBJECT},
                 "required": ["name", "parameters"]} for tool in request.tools]}}
        if request.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return ToolPlan("required", tools, constraint=Constraint("json", schema))
    if choice == "none":
        return ToolPlan("none", tools)
    if parser is None:
        raise bad_request("this model's chat template does not render tools, so it cannot "
                          "choose to call them; name a function in tool_choice (or "
                          "'required') to force a call", param="tools")
    return ToolPlan("auto", tools, parser=parser)


def parse_tool_calls(plan: ToolPlan, text: str) -> tuple[str | None, list[dict]]:
    """``(content, tool_calls)`` of a finished output of a forced call."""
    if plan.mode == "named":
        return None, [tool_call(plan.function, text.strip())]
    if plan.mode == "required":
        try:
            calls = [tool_call(c["name"], c.get("parameters", {})) for c in json.loads(text)]
        except (ValueError, TypeError, KeyError, AttributeError):
            return text, []  # cut short (max_tokens): what was generated, as text
        return None, calls
    return text, []


class StreamingToolParser:
    """A forced call's streamed output as tool-call deltas.

    ``feed(delta)`` returns ``(content_delta, tool_call_deltas)``; ``finish()`` flushes
    what was held back. A named function's arguments stream as they are generated (as
    OpenAI's API does); ``required``'s JSON list is sent whole once it is complete.
    """

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.buffer = ""
        self.sent_calls = 0
        self.named_id = new_call_id()

    @property
    def called(self) -> bool:
        return self.sent_calls > 0

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        if self.plan.mode == "named":
            if not delta and self.sent_calls:
                return "", []
            first = self.sent_calls == 0
            self.sent_calls = 1
            head = {"id": self.named_id, "type": "function"} if first else {}
            function = {"name": self.plan.function, "arguments": delta} if first \
                else {"arguments": delta}
            return "", [{"index": 0, **head, "function": function}]
        self.buffer += delta
        return "", []

    def finish(self) -> tuple[str, list[dict]]:
        text, self.buffer = self.buffer, ""
        if self.plan.mode == "named" or not text:
            return "", []
        content, calls = parse_tool_calls(self.plan, text)
        out = [{"index": self.sent_calls + i, **call} for i, call in enumerate(calls)]
        self.sent_calls += len(out)
        return content or "", out


def message_for_template(message: Any) -> dict:
    """A chat message as chat templates take it (tool-call arguments as objects)."""
    record: dict[str, Any] = {"role": message.role, "content": message.text()}
    if message.content is None and message.tool_calls:
        record["content"] = None
    if message.name is not None:
        record["name"] = message.name
    if message.tool_call_id is not None:
        record["tool_call_id"] = message.tool_call_id
    reasoning = message.reasoning_content if message.reasoning_content is not None \
        else message.reasoning
    if reasoning is not None:
        record["reasoning_content"] = record["reasoning"] = reasoning
    if message.tool_calls:
        record["tool_calls"] = []
        for call in message.tool_calls:
            try:
                arguments = json.loads(call.function.arguments)
            except ValueError:
                arguments = call.function.arguments
            record["tool_calls"].append({"id": call.id, "type": "function", "function": {
                "name": call.function.name, "arguments": arguments}})
    return record
