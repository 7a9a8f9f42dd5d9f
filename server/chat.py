"""POST /v1/chat/completions, and the chat run the Responses API shares (``prepare_chat``)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response

from server.backends.base import SamplingOptions
from server.errors import APIError, bad_request
from server.http import DONE, on_disconnect, sse, stream_events
from server.logprobs import chat_logprobs
from server.outputs import OutputReader
from server.parsing import ParsedText, ParseRequest
from server.prompts import Prompt, chat_prompt, check_prompt, template_kwargs
from server.runner import Run
from server.sampling import sampling_options
from server.schemas import ChatCompletionRequest, ChatCompletionResponse
from server.state import ServerState
from server.tools import ToolPlan, message_for_template, plan_tools


@dataclass
class ChatSetup:
    """One chat request made ready to run: its prompt, tools, sampling and parsers."""

    prompt: Prompt
    plan: ToolPlan | None
    sampling: SamplingOptions
    parse_request: ParseRequest | None  # None: no engine parser reads the output
    include_reasoning: bool
    parallel_tool_calls: bool | None

    def reader(self, state: ServerState) -> OutputReader:
        """A reader for one sequence (parsers keep streaming state)."""
        parser = None if self.parse_request is None else \
            state.backend.output_parser(self.parse_request)
        return OutputReader(parser, self.plan, self.parallel_tool_calls, self.include_reasoning)


def prepare_chat(state: ServerState, body: ChatCompletionRequest) -> ChatSetup:
    """The prompt through the chat template, the tool plan, the engine's parsers for the
    output and the sampling options (a 400 names what cannot be done)."""
    info = state.backend.info
    if state.reasoning_parser is None:
        # Without a reasoning parser there is no reasoning to direct or leave out.
        for name, unset in (("reasoning_effort", None), ("include_reasoning", True)):
            if getattr(body, name) != unset:
                raise bad_request(f"{name} needs a reasoning model served with "
                                  "--reasoning-parser", param=name)
    plan = plan_tools(body, state.tool_parser)
    prompt = chat_prompt(info, body, plan.tools if plan else None)
    if body.max_completion_tokens is not None and body.max_tokens is not None \
            and body.max_completion_tokens != body.max_tokens:
        raise bad_request("max_tokens and max_completion_tokens disagree", "max_completion_tokens")
    # Reasoning and answer share max_tokens, as in vLLM.
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
    auto_tools = plan is not None and plan.mode == "auto"
    parse_request = None
    if state.reasoning_parser is not None or auto_tools:
        parse_request = ParseRequest(
            reasoning=state.reasoning_parser, tools=state.tool_parser,
            tool_definitions=plan.tools if plan else [],
            messages=[message_for_template(m) for m in body.messages],
            chat_template_kwargs=template_kwargs(body), prompt_token_ids=prompt.token_ids,
            auto_tools=auto_tools)
    setup = ChatSetup(prompt, plan, sampling, parse_request, body.include_reasoning,
                      body.parallel_tool_calls)
    if parse_request is not None:
        try:
            probe = state.backend.output_parser(parse_request)
        except ValueError as error:  # the engine's request model refused the conversation
            raise bad_request(f"the engine's output parser cannot read these messages: "
                              f"{error}", param="messages") from error
        if probe.skip_special_tokens() is False:
            sampling.skip_special_tokens = False
        if state.reasoning_parser is not None:
            # Where constrained decoding starts: after the reasoning, unless the prompt
            # ended it or the reasoning is not returned (vLLM's rule).
            sampling.reasoning_ended = not body.include_reasoning or probe.reasoning_ended()
            sampling.reasoning_kwargs = parse_request.chat_template_kwargs
    return setup


def message_fields(parsed: ParsedText) -> dict:
    """An assistant message's (or delta's) reasoning under both of its names."""
    return {"reasoning_content": parsed.reasoning, "reasoning": parsed.reasoning}


@dataclass
class _ChatChoice:
    reader: OutputReader
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    started: bool = False


async def create_chat_completion(
    state: ServerState, body: ChatCompletionRequest, request: Request
):
    setup = prepare_chat(state, body)
    prompt = setup.prompt
    run = Run(state.backend, state.admission, state.metrics, "chat", [prompt.token_ids],
              setup.sampling, cache_salt=body.cache_salt, stream=body.stream,
              model=state.adapter_name(body.model))
    created = int(time.time())
    response_id = f"chatcmpl-{body.request_id or run.request_id}"
    choices = {i: _ChatChoice(setup.reader(state)) for i in range(body.n)}
    top_k = body.top_logprobs or 0
    # Logprobs would show the reasoning's tokens that include_reasoning leaves out (vLLM).
    with_logprobs = body.logprobs and (body.include_reasoning or setup.parse_request is None
                                       or state.reasoning_parser is None)

    def usage() -> dict:
        completion = sum(len(c.token_ids) for c in choices.values())
        return {"prompt_tokens": len(prompt.token_ids), "completion_tokens": completion,
                "total_tokens": len(prompt.token_ids) + completion}

    def add(choice: _ChatChoice, seq) -> list[dict] | None:
        choice.text.append(seq.text)
        choice.token_ids.extend(seq.token_ids)
        if with_logprobs and seq.logprobs is not None:
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
            parsed = c.reader.whole("".join(c.text), c.token_ids)
            reason = c.reader.finish_reason(c.finish_reason, whole=True)
            rendered.append({"index": i, "logprobs": {"content": c.logprobs} if with_logprobs
                             else None, "finish_reason": reason,
                             "message": {"role": "assistant", "content": parsed.content,
                                         **message_fields(parsed),
                                         "tool_calls": parsed.tool_calls}})
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
                    finished = seq.finish_reason is not None
                    parsed = choice.reader.delta(seq.text, seq.token_ids, finished)
                    if parsed is None and not finished and entries is None and choice.started:
                        continue  # nothing to say yet (e.g. a tool call's opening tag)
                    delta: dict = {}
                    if parsed is not None:
                        if parsed.reasoning:
                            delta.update(message_fields(parsed))
                        if parsed.content or not (parsed.reasoning or parsed.tool_calls):
                            delta["content"] = parsed.content or ""
                        if parsed.tool_calls:
                            delta["tool_calls"] = parsed.tool_calls
                    if not choice.started:
                        choice.started = True
                        delta = {"role": "assistant", **delta}
                    sent = True
                    yield chunk(seq.index, delta, entries,
                                choice.reader.finish_reason(seq.finish_reason))
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
