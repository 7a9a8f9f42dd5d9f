"""Tool calling in chat: what the model is told, how its output is constrained, and how
tool calls are read back out of its text (whole or streamed).

- ``tool_choice`` ``none``: the tools are rendered, nothing is parsed (as vLLM does).
- ``auto``: the tools are rendered with the model's chat template, and the output is
  parsed in the host family's format: ``hermes`` (Qwen2/Qwen3: ``<tool_call>{...}
  </tool_call>``) or ``llama3_json`` (Llama 3: ``{"name": ..., "parameters": ...}``).
- ``required`` and a named function: constrained decoding makes the output a JSON list of
  ``{"name", "parameters"}`` calls, or the named function's arguments, as vLLM does.

Engine-neutral: parsing is text in, OpenAI ``tool_calls`` out.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from server.backends.base import Constraint
from server.errors import bad_request
from server.schemas import ChatCompletionRequest, NamedToolChoice

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
PARSERS = ("hermes", "llama3_json")
_EMPTY_OBJECT = {"type": "object", "properties": {}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call(name: str, arguments: Any, call_id: str | None = None) -> dict:
    """One OpenAI ``tool_calls`` entry; ``arguments`` as JSON text."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments,
                                                                   ensure_ascii=False)
    return {"id": call_id or new_call_id(), "type": "function",
            "function": {"name": name, "arguments": text}}


def parser_for(chat_template: str | dict | None) -> str | None:
    """The tool-call format a chat template renders, or None if it renders no tools."""
    if isinstance(chat_template, dict):  # named templates ("default", "tool_use", ...)
        chat_template = "\n".join(chat_template.values())
    if not chat_template or "tools" not in chat_template:
        return None
    if "<tool_call>" in chat_template:
        return "hermes"
    if "python_tag" in chat_template or "ipython" in chat_template:
        return "llama3_json"
    return None


@dataclass
class ToolPlan:
    """How one chat request uses its tools."""

    mode: str  # "none" | "auto" | "required" | "named"
    tools: list[dict] = field(default_factory=list)  # as the chat template takes them
    parser: str | None = None  # auto: the output format
    function: str | None = None  # named: the function forced
    constraint: Constraint | None = None  # required / named: the output's shape

    @property
    def parses(self) -> bool:
        return self.mode in ("auto", "required", "named")


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


def parse_tool_calls(plan: ToolPlan, text: str,
                     parallel: bool | None = None) -> tuple[str | None, list[dict]]:
    """``(content, tool_calls)`` of a finished output."""
    if plan.mode == "named":
        return None, [tool_call(plan.function, text.strip())]
    if plan.mode == "required":
        try:
            calls = [tool_call(c["name"], c.get("parameters", {})) for c in json.loads(text)]
        except (ValueError, TypeError, KeyError):
            return text, []  # cut short (max_tokens): what was generated, as text
        return None, calls
    if plan.mode != "auto":
        return text, []
    content, calls = (_parse_hermes(text) if plan.parser == "hermes"
                      else _parse_llama3_json(text))
    if parallel is False:
        calls = calls[:1]
    return content, calls


def _parse_hermes(text: str) -> tuple[str | None, list[dict]]:
    calls, kept, position = [], [], 0
    for match in re.finditer(re.escape(HERMES_OPEN) + r"(.*?)" + re.escape(HERMES_CLOSE),
                             text, re.S):
        call = _json_call(match.group(1))
        if call is None:
            continue
        kept.append(text[position:match.start()])
        position = match.end()
        calls.append(call)
    if not calls:
        return text, []
    kept.append(text[position:])
    content = "".join(kept).strip()
    return content or None, calls


def _parse_llama3_json(text: str) -> tuple[str | None, list[dict]]:
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    if not body.startswith("{"):
        return text, []
    calls = [_json_call(part) for part in body.split(";") if part.strip()]
    if not calls or any(c is None for c in calls):
        return text, []
    return None, calls


def _json_call(text: str) -> dict | None:
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        return None
    arguments = record.get("arguments", record.get("parameters", {}))
    return tool_call(record["name"], arguments)


class StreamingToolParser:
    """Splits a streamed output into content deltas and tool-call deltas.

    ``feed(delta)`` returns ``(content_delta, tool_call_deltas)``; ``finish()`` flushes
    what was held back. Content that might be the start of a tool call is held until it
    is clear; a call is sent whole once it is complete (a named function's arguments
    stream as they come, as OpenAI's API does).
    """

    def __init__(self, plan: ToolPlan, parallel: bool | None = None) -> None:
        self.plan = plan
        self.parallel = parallel
        self.buffer = ""
        self.sent_calls = 0
        self.named_id = new_call_id()

    @property
    def called(self) -> bool:
        return self.sent_calls > 0

    def _deltas(self, calls: list[dict]) -> list[dict]:
        if self.parallel is False:
            calls = calls[: max(1 - self.sent_calls, 0)]
        out = [{"index": self.sent_calls + i, **call} for i, call in enumerate(calls)]
        self.sent_calls += len(out)
        return out

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        mode = self.plan.mode
        if mode == "named":
            if not delta and self.sent_calls:
                return "", []
            first = self.sent_calls == 0
            self.sent_calls = 1
            head = {"id": self.named_id, "type": "function"} if first else {}
            function = {"name": self.plan.function, "arguments": delta} if first \
                else {"arguments": delta}
            return "", [{"index": 0, **head, "function": function}]
        if mode == "required" or (mode == "auto" and self.plan.parser == "llama3_json"):
            self.buffer += delta
            if mode == "auto" and not self.buffer.lstrip().startswith(("{", "<")) \
                    and self.buffer.strip():
                text, self.buffer = self.buffer, ""
                self.plan = ToolPlan("none")  # plain content from here on
                return text, []
            return "", []
        if mode != "auto":
            return delta, []
        self.buffer += delta
        content, calls = [], []
        while True:
            start = self.buffer.find(HERMES_OPEN)
            if start < 0 or self.buffer.find(HERMES_CLOSE, start) < 0:
                # Hold back what may begin a call, and the whitespace before it (a call's
                # neighbouring whitespace is not content, as in the whole-text parse).
                cut = start if start >= 0 else \
                    len(self.buffer) - _partial_suffix(self.buffer, HERMES_OPEN)
                while cut > 0 and self.buffer[cut - 1].isspace():
                    cut -= 1
                content.append(self.buffer[:cut])
                self.buffer = self.buffer[cut:]
                break
            end = self.buffer.find(HERMES_CLOSE, start)
            call = _json_call(self.buffer[start + len(HERMES_OPEN):end])
            block_end = end + len(HERMES_CLOSE)
            if call is None:
                content.append(self.buffer[:block_end])
            else:
                content.append(self.buffer[:start])
                calls.append(call)
            self.buffer = self.buffer[block_end:]
        text = "".join(content)
        if calls or self.called:
            text = text.strip()
        return text, self._deltas(calls)

    def finish(self) -> tuple[str, list[dict]]:
        text, self.buffer = self.buffer, ""
        if self.plan.mode == "named" or not text:
            return "", []
        content, calls = parse_tool_calls(self.plan, text, self.parallel)
        deltas = self._deltas(calls)
        return ((content or "").strip() if self.called else content or ""), deltas


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that starts ``marker`` (held back for now)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def message_for_template(message: Any) -> dict:
    """A chat message as chat templates take it (tool-call arguments as objects)."""
    record: dict[str, Any] = {"role": message.role, "content": message.text()}
    if message.content is None and message.tool_calls:
        record["content"] = None
    if message.name is not None:
        record["name"] = message.name
    if message.tool_call_id is not None:
        record["tool_call_id"] = message.tool_call_id
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
