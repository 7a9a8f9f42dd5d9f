"""POST /v1/chat/completions."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response

from server.errors import APIError, bad_request
from server.http import DONE, on_disconnect, sse, stream_events
from server.logprobs import chat_logprobs
from server.prompts import chat_prompt, check_prompt
from server.runner import Run
from server.sampling import sampling_options
from server.schemas import ChatCompletionRequest, ChatCompletionResponse
from server.state import ServerState
from server.tools import StreamingToolParser, parse_tool_calls, plan_tools


@dataclass
class _ChatChoice:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    started: bool = False
    tools: StreamingToolParser | None = None


def _finish(reason: str | None) -> str | None:
    return None if reason is None else ("stop" if reason == "abort" else reason)


def _tool_finish(reason: str | None, mode: str, called: bool) -> str | None:
    """OpenAI's finish reason when tools were called: ``tool_calls`` for ``auto`` and
    ``required``, ``stop`` for a named function (as vLLM's server does)."""
    reason = _finish(reason)
    return "tool_calls" if called and mode != "named" and reason == "stop" else reason


async def create_chat_completion(
    state: ServerState, body: ChatCompletionRequest, request: Request
):
    info = state.backend.info
    plan = plan_tools(body, state.tool_parser)
    prompt = chat_prompt(info, body, plan.tools if plan else None)
    if body.max_completion_tokens is not None and body.max_tokens is not None \
            and body.max_completion_tokens != body.max_tokens:
        raise bad_request("max_tokens and max_completion_tokens disagree", "max_completion_tokens")
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:
        # OpenAI's default: whatever the context has left.
        max_tokens = max(info.max_model_len - len(prompt.token_ids), 1)
    check_prompt(info, prompt.token_ids, max_tokens, "messages")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
    top_k = body.top_logprobs or 0
    sampling = sampling_options(body, info, max_tokens, top_k if body.logprobs else None,
                                constraint=plan.constraint if plan else None)
    run = Run(state.backend, state.admission, state.metrics, "chat", [prompt.token_ids],
              sampling, cache_salt=body.cache_salt, stream=body.stream,
              model=state.adapter_name(body.model))
    created = int(time.time())
    response_id = f"chatcmpl-{body.request_id or run.request_id}"
    choices = {i: _ChatChoice() for i in range(body.n)}
    parses = plan is not None and plan.parses

    def usage() -> dict:
        completion = sum(len(c.token_ids) for c in choices.values())
        return {"prompt_tokens": len(prompt.token_ids), "completion_tokens": completion,
                "total_tokens": len(prompt.token_ids) + completion}

    def add(choice: _ChatChoice, seq) -> list[dict] | None:
        choice.text.append(seq.text)
        choice.token_ids.extend(seq.token_ids)
        if body.logprobs and seq.logprobs is not None:
            entries = chat_logprobs(seq.token_ids, seq.logprobs, top_k,
                                    body.return_tokens_as_token_ids)
            choice.logprobs.extend(entries)
            return entries
        return None

    if not body.stream:
        async with on_disconnect(request, lambda: run.abort("client_disconnect")):
            async for _, output in run.outputs():
                for seq in output.sequences:
                    choice = choices[seq.index]
                    add(choice, seq)
                    if seq.finish_reason is not None:
                        choice.finish_reason = seq.finish_reason
        state.metrics.latency.labels("chat").observe(time.monotonic() - run.start)
        rendered = []
        for i, c in choices.items():
            content, calls = "".join(c.text), []
            if parses:
                content, calls = parse_tool_calls(plan, content, body.parallel_tool_calls)
            reason = (_tool_finish(c.finish_reason, plan.mode, bool(calls)) if parses
                      else _finish(c.finish_reason))
            rendered.append({"index": i, "logprobs": {"content": c.logprobs} if body.logprobs
                             else None, "finish_reason": reason,
                             "message": {"role": "assistant", "content": content,
                                         "tool_calls": calls}})
        response = ChatCompletionResponse(id=response_id, created=created, model=run.model_name,
                                          usage=usage(), choices=rendered)
        return Response(content=response.model_dump_json(), media_type="application/json")

    options = body.stream_options
    include_usage = options is not None and (options.include_usage or
                                             options.continuous_usage_stats)
    continuous = options is not None and options.continuous_usage_stats

    def chunk(index: int, delta: dict, logprobs, finish: str | None) -> str:
        event = {"id": response_id, "object": "chat.completion.chunk", "created": created,
                 "model": run.model_name,
                 "choices": [{"index": index, "delta": delta,
                              "logprobs": None if logprobs is None else {"content": logprobs},
                              "finish_reason": finish}]}
        if continuous:
            event["usage"] = usage()
        return sse(event)

    async def events() -> AsyncIterator[str]:
        sent = False
        try:
            async for _, output in run.outputs():
                for seq in output.sequences:
                    choice = choices[seq.index]
                    entries = add(choice, seq)
                    text, calls = seq.text, []
                    finish = _finish(seq.finish_reason)
                    if parses:
                        if choice.tools is None:
                            choice.tools = StreamingToolParser(plan, body.parallel_tool_calls)
                        text, calls = choice.tools.feed(seq.text)
                        if seq.finish_reason is not None:
                            rest, more = choice.tools.finish()
                            text, calls = text + rest, calls + more
                            finish = _tool_finish(seq.finish_reason, plan.mode,
                                                  choice.tools.called)
                    delta: dict = {"content": text} if text or not calls else {}
                    if calls:
                        delta["tool_calls"] = calls
                    if not choice.started:
                        choice.started = True
                        delta = {"role": "assistant", **delta}
                    sent = True
                    yield chunk(seq.index, delta, entries, finish)
        except APIError as error:
            if not sent:
                raise
            yield sse(error.body())
        else:
            if include_usage:
                yield sse({"id": response_id, "object": "chat.completion.chunk",
                           "created": created, "model": run.model_name, "choices": [],
                           "usage": usage()})
            state.metrics.latency.labels("chat").observe(time.monotonic() - run.start)
        yield DONE

    return await stream_events(request, events(), lambda: run.abort("client_disconnect"))
