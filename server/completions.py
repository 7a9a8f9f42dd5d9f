"""POST /v1/completions."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response

from server.errors import APIError, bad_request
from server.http import DONE, on_disconnect, sse, stream_events
from server.logprobs import CompletionLogprobBuilder
from server.prompts import completion_prompts
from server.runner import Run
from server.sampling import sampling_options
from server.schemas import CompletionRequest, CompletionResponse
from server.state import ServerState


@dataclass
class _CompletionChoice:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: CompletionLogprobBuilder | None = None
    echoed: bool = False


def _finish(reason: str | None) -> str | None:
    return None if reason is None else ("stop" if reason == "abort" else reason)


async def create_completion(state: ServerState, body: CompletionRequest, request: Request):
    info = state.backend.info
    if body.max_tokens == 0 and not body.echo:
        raise bad_request("max_tokens must be at least 1 (0 is allowed only with echo)",
                          param="max_tokens")
    prompts = completion_prompts(info, body)
    echo_only = body.echo and body.max_tokens == 0
    # echo + logprobs scores the prompt itself (lm-eval's loglikelihood requests).
    prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    sampling = sampling_options(body, info, max(body.max_tokens or 0, 1), body.logprobs,
                                prompt_logprobs)
    run = Run(state.backend, state.admission, state.metrics, "completions",
              [p.token_ids for p in prompts], sampling, cache_salt=body.cache_salt,
              stream=body.stream, model=state.adapter_name(body.model))
    created = int(time.time())
    response_id = f"cmpl-{body.request_id or run.request_id}"
    tokenizer = info.tokenizer
    n = body.n

    def new_choice() -> _CompletionChoice:
        builder = None
        if body.logprobs is not None:
            builder = CompletionLogprobBuilder(body.logprobs, tokenizer,
                                               body.return_tokens_as_token_ids)
        return _CompletionChoice(logprobs=builder)

    def echo_into(choice: _CompletionChoice, prompt_index: int, prompt_lps) -> str:
        prompt = prompts[prompt_index]
        choice.echoed = True
        if choice.logprobs is not None:
            choice.logprobs.add(prompt.token_ids, prompt_lps or [None] * len(prompt.token_ids))
        return prompt.text if prompt.text is not None else tokenizer.decode(prompt.token_ids)

    def usage(choices: dict[int, _CompletionChoice]) -> dict:
        completion = sum(len(c.token_ids) for c in choices.values())
        prompt = sum(len(p.token_ids) for p in prompts)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    if not body.stream:
        choices = {i: new_choice() for i in range(len(prompts) * n)}
        async with on_disconnect(request, lambda: run.abort("client_disconnect")):
            async for prompt_index, output in run.outputs():
                for seq in output.sequences:
                    choice = choices[prompt_index * n + seq.index]
                    if body.echo and not choice.echoed:
                        choice.text.append(echo_into(choice, prompt_index,
                                                     output.prompt_logprobs))
                    if echo_only:
                        choice.finish_reason = "length"
                        continue
                    choice.text.append(seq.text)
                    choice.token_ids.extend(seq.token_ids)
                    if choice.logprobs is not None and seq.logprobs is not None:
                        choice.logprobs.add(seq.token_ids, seq.logprobs)
                    if seq.finish_reason is not None:
                        choice.finish_reason = _finish(seq.finish_reason)
        state.metrics.latency.labels("completions").observe(time.monotonic() - run.start)
        result = {
            "id": response_id, "object": "text_completion", "created": created,
            "model": run.model_name,
            "choices": [
                {"index": i, "text": "".join(c.text),
                 "logprobs": c.logprobs.dump() if c.logprobs is not None else None,
                 "finish_reason": c.finish_reason}
                for i, c in choices.items()
            ],
            "usage": usage(choices),
        }
        body_json = CompletionResponse.model_validate(result).model_dump_json()
        return Response(content=body_json, media_type="application/json")

    options = body.stream_options
    include_usage = options is not None and (options.include_usage or
                                             options.continuous_usage_stats)
    continuous = options is not None and options.continuous_usage_stats

    async def events() -> AsyncIterator[str]:
        choices = {i: new_choice() for i in range(len(prompts) * n)}

        def chunk(index: int, text: str, choice: _CompletionChoice, finish: str | None) -> str:
            logprobs = choice.logprobs.take() if choice.logprobs is not None else None
            event = {"id": response_id, "object": "text_completion", "created": created,
                     "model": run.model_name,
                     "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                  "finish_reason": finish}]}
            if continuous:
                event["usage"] = usage(choices)
            return sse(event)

        sent = False
        try:
            async for prompt_index, output in run.outputs():
                for seq in output.sequences:
                    index = prompt_index * n + seq.index
                    choice = choices[index]
                    text = ""
                    if body.echo and not choice.echoed:
                        text = echo_into(choice, prompt_index, output.prompt_logprobs)
                    if echo_only:
                        sent = True
                        yield chunk(index, text, choice, "length")
                        continue
                    text += seq.text
                    choice.token_ids.extend(seq.token_ids)
                    if choice.logprobs is not None and seq.logprobs is not None:
                        choice.logprobs.add(seq.token_ids, seq.logprobs)
                    sent = True
                    yield chunk(index, text, choice, _finish(seq.finish_reason))
        except APIError as error:
            if not sent:
                raise  # nothing sent yet: stream_events turns it into an HTTP error
            yield sse(error.body())
        else:
            if include_usage:
                yield sse({"id": response_id, "object": "text_completion", "created": created,
                           "model": run.model_name, "choices": [], "usage": usage(choices)})
            state.metrics.latency.labels("completions").observe(time.monotonic() - run.start)
        yield DONE

    return await stream_events(request, events(), lambda: run.abort("client_disconnect"))
