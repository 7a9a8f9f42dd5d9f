"""POST /v1/responses: OpenAI's Responses API, served as a chat completion.

The input (text, or messages and items) becomes chat messages: ``instructions`` a system
message, earlier ``function_call`` items an assistant turn's tool calls, their
``function_call_output`` items tool turns, a ``reasoning`` item the next assistant turn's
reasoning. ``text.format`` is the output constraint, function ``tools`` are chat tools, and
the output is read by the same parsers as chat (``server.outputs``): a reasoning item, a
message, function calls. Streaming sends the Responses event types (``response.created``
... ``response.completed``). Nothing is stored: ``store`` and ``previous_response_id`` are
refused by name (``server.responses_schemas``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from server.chat import ChatSetup, prepare_chat
from server.errors import APIError, from_validation, unsupported
from server.http import on_disconnect, parse, sse, stream_events
from server.outputs import OutputReader
from server.parsing import ParsedText
from server.responses_schemas import (
    REFUSED_NESTED,
    FunctionCallItem,
    FunctionCallOutputItem,
    InputMessage,
    ReasoningItem,
    ResponseObject,
    ResponsesRequest,
)
from server.runner import Run
from server.schemas import ChatCompletionRequest, SamplingRequest
from server.state import ServerState

# Chat fields named in an error, as the Responses request names them.
_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens",
           "max_completion_tokens": "max_output_tokens", "response_format": "text",
           "reasoning_effort": "reasoning"}
# Fields that mean the same in a chat request.
_SAME = (*SamplingRequest.model_fields, "parallel_tool_calls", "include_reasoning",
         "chat_template_kwargs")


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def refuse_nested(raw: dict) -> None:
    """``text.verbosity``, ``reasoning.summary``: set, they are refused by name."""
    for outer, inner in REFUSED_NESTED:
        value = raw.get(outer)
        if isinstance(value, dict) and value.get(inner) is not None:
            raise unsupported(f"{outer}.{inner}")


def chat_messages(body: ResponsesRequest) -> list[dict]:
    """The input as chat messages (``instructions`` first, as a system message)."""
    messages: list[dict] = []
    if body.instructions is not None:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        return [*messages, {"role": "user", "content": body.input}]
    reasoning: str | None = None

    def assistant() -> dict:
        """The current assistant turn (earlier calls and reasoning gather into one)."""
        nonlocal reasoning
        last = messages[-1] if messages else None
        if last is None or last["role"] != "assistant" or last.get("_closed"):
            last = {"role": "assistant", "content": None}
            messages.append(last)
        if reasoning is not None:
            last["reasoning_content"], reasoning = reasoning, None
        return last

    for item in body.input:
        if isinstance(item, ReasoningItem):
            reasoning = (reasoning or "") + item.text()
        elif isinstance(item, FunctionCallItem):
            turn = assistant()
            turn.setdefault("tool_calls", []).append({
                "id": item.call_id, "type": "function",
                "function": {"name": item.name, "arguments": item.arguments}})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id,
                             "content": item.text()})
        elif isinstance(item, InputMessage) and item.role == "assistant":
            turn = assistant()
            turn["content"] = (turn["content"] or "") + item.text()
            turn["_closed"] = True  # a message ends the model's turn
        else:
            messages.append({"role": item.role, "content": item.text()})
    for message in messages:
        message.pop("_closed", None)
    return messages


def chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion that serves a Responses request."""
    fields = body.model_dump(include=set(_SAME), exclude_none=True, by_alias=True)
    chat: dict[str, Any] = {**fields, "messages": chat_messages(body)}
    if body.max_output_tokens is not None:
        chat["max_tokens"] = body.max_output_tokens
    if body.tools:
        chat["tools"] = [{"type": "function", "function": tool.model_dump(
            exclude={"type"}, exclude_none=True)} for tool in body.tools]
    if isinstance(body.tool_choice, str):
        chat["tool_choice"] = body.tool_choice
    elif body.tool_choice is not None:
        chat["tool_choice"] = {"type": "function", "function": {"name": body.tool_choice.name}}
    fmt = body.text.format if body.text is not None else None
    if fmt is not None and fmt.type == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": fmt.model_dump(
            include={"name", "description", "schema_", "strict"}, by_alias=True,
            exclude_none=True)}
    elif fmt is not None:
        chat["response_format"] = {"type": fmt.type}
    if body.reasoning is not None and body.reasoning.effort is not None:
        chat["reasoning_effort"] = body.reasoning.effort
    try:
        return ChatCompletionRequest.model_validate(chat)
    except ValueError as error:  # pydantic's, on what a chat request allows
        raise _renamed(from_validation(error)) from error


def _renamed(error: APIError) -> APIError:
    if error.param in _PARAMS:
        error.param = _PARAMS[error.param]
    return error


class ResponseBuilder:
    """The response object and its output items, built whole or event by event."""

    def __init__(self, body: ResponsesRequest, model: str, setup: ChatSetup) -> None:
        self.body = body
        self.setup = setup
        self.id = _id("resp")
        self.created = int(time.time())
        self.model = model
        self.items: list[dict] = []
        self.sequence = 0
        self.open: dict | None = None  # the item being streamed
        self.calls: dict[int, dict] = {}  # streamed tool calls by their index

    def response(self, status: str, usage: dict | None = None,
                 incomplete: str | None = None) -> ResponseObject:
        body = self.body
        text = {"format": body.text.format.model_dump(by_alias=True, exclude_none=True)} \
            if body.text is not None and body.text.format is not None else \
            {"format": {"type": "text"}}
        tool_choice = body.tool_choice if isinstance(body.tool_choice, str) or \
            body.tool_choice is None else body.tool_choice.model_dump()
        record = ResponseObject(
            id=self.id, created_at=self.created, status=status, model=self.model,
            output=self.items, usage=usage,
            incomplete_details={"reason": incomplete} if incomplete else None,
            instructions=body.instructions, max_output_tokens=body.max_output_tokens,
            temperature=body.temperature, top_p=body.top_p, tools=body.tools or [],
            tool_choice=tool_choice or "auto",
            parallel_tool_calls=body.parallel_tool_calls is not False, text=text,
            reasoning=body.reasoning.model_dump(exclude_none=True) if body.reasoning else None,
            metadata=body.metadata or {}, user=body.user)
        return record

    # --- whole ----------------------------------------------------------------------------

    def add_whole(self, parsed: ParsedText, status: str) -> None:
        if parsed.reasoning:
            self.items.append(self._reasoning(parsed.reasoning, status))
        if parsed.content or not (parsed.tool_calls or parsed.reasoning):
            self.items.append(self._message(parsed.content or "", status))
        for call in parsed.tool_calls:
            self.items.append(self._call(call["id"], call["function"]["name"],
                                         call["function"]["arguments"], status))

    @staticmethod
    def _reasoning(text: str, status: str) -> dict:
        return {"type": "reasoning", "id": _id("rs"), "summary": [],
                "content": [{"type": "reasoning_text", "text": text}], "status": status}

    @staticmethod
    def _message(text: str, status: str) -> dict:
        return {"type": "message", "id": _id("msg"), "role": "assistant",
                "status": status, "content": [{"type": "output_text", "text": text,
                                               "annotations": [], "logprobs": []}]}

    @staticmethod
    def _call(call_id: str, name: str, arguments: str, status: str) -> dict:
        return {"type": "function_call", "id": _id("fc"), "call_id": call_id, "name": name,
                "arguments": arguments, "status": status}

    # --- streamed -------------------------------------------------------------------------

    def event(self, kind: str, **fields: Any) -> str:
        self.sequence += 1
        # The event line as OpenAI's and vLLM's servers send it (clients may dispatch on it).
        return f"event: {kind}\n" + sse({"type": kind, "sequence_number": self.sequence - 1,
                                         **fields})

    def _open(self, item: dict) -> list[str]:
        events = self.close()
        self.items.append(item)
        self.open = item
        index = len(self.items) - 1
        events.append(self.event("response.output_item.added", output_index=index, item={
            **item, "status": "in_progress",
            **({"content": []} if item["type"] in ("message", "reasoning") else {})}))
        if item["type"] == "message":
            events.append(self.event("response.content_part.added", item_id=item["id"],
                                     output_index=index, content_index=0,
                                     part={**item["content"][0], "text": ""}))
        return events

    def close(self, status: str = "completed") -> list[str]:
        """Finish the item being streamed."""
        item, self.open = self.open, None
        if item is None:
            return []
        index = self.items.index(item)
        item["status"] = status
        events = []
        if item["type"] == "reasoning":
            events.append(self.event("response.reasoning_text.done", item_id=item["id"],
                                     output_index=index, content_index=0,
                                     text=item["content"][0]["text"]))
        elif item["type"] == "message":
            part = item["content"][0]
            events.append(self.event("response.output_text.done", item_id=item["id"],
                                     output_index=index, content_index=0, text=part["text"],
                                     logprobs=[]))
            events.append(self.event("response.content_part.done", item_id=item["id"],
                                     output_index=index, content_index=0, part=part))
        else:
            events.append(self.event("response.function_call_arguments.done",
                                     item_id=item["id"], output_index=index,
                                     name=item["name"], arguments=item["arguments"]))
        events.append(self.event("response.output_item.done", output_index=index, item=item))
        return events

    def add_delta(self, parsed: ParsedText) -> list[str]:
        events: list[str] = []
        if parsed.reasoning:
            if self.open is None or self.open["type"] != "reasoning":
                events += self._open(self._reasoning("", "in_progress"))
            self.open["content"][0]["text"] += parsed.reasoning
            events.append(self.event("response.reasoning_text.delta", item_id=self.open["id"],
                                     output_index=len(self.items) - 1, content_index=0,
                                     delta=parsed.reasoning))
        if parsed.content:
            if self.open is None or self.open["type"] != "message":
                events += self._open(self._message("", "in_progress"))
            self.open["content"][0]["text"] += parsed.content
            events.append(self.event("response.output_text.delta", item_id=self.open["id"],
                                     output_index=len(self.items) - 1, content_index=0,
                                     delta=parsed.content, logprobs=[]))
        for delta in parsed.tool_calls:
            function = delta.get("function") or {}
            call = self.calls.get(delta["index"])
            if call is None:
                call = self._call(delta.get("id") or _id("call"), function.get("name") or "",
                                  "", "in_progress")
                self.calls[delta["index"]] = call
                events += self._open(call)
            elif function.get("name"):
                call["name"] += function["name"]
            arguments = function.get("arguments") or ""
            if arguments:
                call["arguments"] += arguments
                events.append(self.event("response.function_call_arguments.delta",
                                         item_id=call["id"], output_index=self.items.index(call),
                                         delta=arguments))
        return events


async def create_response(state: ServerState, body: ResponsesRequest, request: Request):
    try:
        setup = prepare_chat(state, chat_request(body))
    except APIError as error:
        raise _renamed(error) from error
    run = Run(state.backend, state.admission, state.metrics, "responses",
              [setup.prompt.token_ids], setup.sampling, cache_salt=body.cache_salt,
              stream=body.stream, model=state.adapter_name(body.model))
    builder = ResponseBuilder(body, run.model_name, setup)
    reader: OutputReader = setup.reader(state)
    prompt_tokens = len(setup.prompt.token_ids)
    generated: list[int] = []

    def usage() -> dict:
        return {"input_tokens": prompt_tokens, "output_tokens": len(generated),
                "total_tokens": prompt_tokens + len(generated),
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": reader.reasoning_tokens(
                    generated)}}

    def outcome(reason: str | None) -> tuple[str, str | None]:
        if reason == "length":
            return "incomplete", "max_output_tokens"
        return "completed", None

    if not body.stream:
        texts: list[str] = []
        reason = None
        async with on_disconnect(request, lambda: run.abort("client_disconnect")):
            async for _, output in run.outputs():
                for seq in output.sequences:
                    texts.append(seq.text)
                    generated.extend(seq.token_ids)
                    reason = seq.finish_reason or reason
        state.metrics.latency.labels("responses").observe(time.monotonic() - run.start)
        status, incomplete = outcome(reason)
        builder.add_whole(reader.whole("".join(texts), generated),
                          "incomplete" if incomplete else "completed")
        return Response(content=builder.response(status, usage(), incomplete).model_dump_json(),
                        media_type="application/json")

    def lifecycle(kind: str, status: str, **extra: Any) -> str:
        return builder.event(kind, response=builder.response(status, **extra).model_dump(
            mode="json"))

    async def events() -> AsyncIterator[str]:
        started = False
        try:
            reason = None
            async for _, output in run.outputs():
                if not started:  # after the engine took the request: its 400 stays a 400
                    started = True
                    yield lifecycle("response.created", "in_progress")
                    yield lifecycle("response.in_progress", "in_progress")
                for seq in output.sequences:
                    generated.extend(seq.token_ids)
                    reason = seq.finish_reason or reason
                    parsed = reader.delta(seq.text, seq.token_ids, seq.finish_reason is not None)
                    for event in builder.add_delta(parsed or ParsedText()):
                        yield event
        except APIError as error:
            if not started:
                raise
            for event in builder.close("incomplete"):
                yield event
            yield builder.event("error", code=error.code, message=error.message,
                                param=error.param)
            return
        status, incomplete = outcome(reason)
        for event in builder.close("incomplete" if incomplete else "completed"):
            yield event
        if not builder.items:  # no output at all: an empty message, as a whole answer has
            for event in builder._open(builder._message("", status)) + builder.close(status):
                yield event
        state.metrics.latency.labels("responses").observe(time.monotonic() - run.start)
        # Always response.completed, its status "incomplete" when max_output_tokens cut it
        # short (as vLLM's server does; the OpenAI SDK's stream helper waits for it).
        yield lifecycle("response.completed", status, usage=usage(), incomplete=incomplete)

    return await stream_events(request, events(), lambda: run.abort("client_disconnect"))


def parse_responses(raw: Any, refused: dict) -> ResponsesRequest:
    """The request body, its refusals first (``server.http.parse`` for the top level)."""
    if isinstance(raw, dict):
        refuse_nested(raw)
    return parse(ResponsesRequest, raw, refused)
