"""OpenAI sampling fields to the engine-neutral ``SamplingOptions``."""

from __future__ import annotations

from server.backends.base import Constraint, ModelInfo, SamplingOptions
from server.errors import bad_request
from server.schemas import _SamplingFields
from talan_serve.switch import parse_switch


def sampling_options(
    request: _SamplingFields,
    info: ModelInfo,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    constraint: Constraint | None = None,
) -> SamplingOptions:
    """``constraint`` (from tool calling) takes the place of the request's own, which it
    may not also have."""
    temperature = 1.0 if request.temperature is None else request.temperature
    if request.n > 1 and temperature == 0.0:
        # Greedy decoding would return n identical choices; engines refuse it too.
        raise bad_request("n > 1 needs temperature > 0 (greedy choices would be identical)",
                          param="n")
    if request.min_tokens is not None and request.min_tokens > max_tokens:
        raise bad_request(f"min_tokens ({request.min_tokens}) is above max_tokens "
                          f"({max_tokens})", param="min_tokens")
    own = request_constraint(request)
    if own is not None and constraint is not None:
        raise bad_request("a forced tool call already constrains the output; drop "
                          "response_format / structured_outputs", param="tool_choice")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=max(request.top_k or 0, 0),
        min_p=request.min_p or 0.0,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        repetition_penalty=1.0 if request.repetition_penalty is None
        else request.repetition_penalty,
        logit_bias=_logit_bias(request, info.vocab_size),
        min_tokens=request.min_tokens or 0,
        allowed_token_ids=_in_vocab(request.allowed_token_ids, info.vocab_size,
                                    "allowed_token_ids"),
        bad_words=list(request.bad_words) if request.bad_words else None,
        seed=request.seed,
        stop=[s for s in stop if s],
        stop_token_ids=list(request.stop_token_ids or []),
        include_stop_str_in_output=request.include_stop_str_in_output,
        skip_special_tokens=request.skip_special_tokens,
        spaces_between_special_tokens=request.spaces_between_special_tokens,
        n=request.n,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        ignore_eos=request.ignore_eos,
        constraint=constraint or own,
        talan_enabled=parse_switch(request.talan),
    )


def request_constraint(request: _SamplingFields) -> Constraint | None:
    """The output constraint a request asks for: ``response_format`` or vLLM's
    ``structured_outputs`` (one of them)."""
    fmt, structured = request.response_format, request.structured_outputs
    if fmt is not None and fmt.type != "text" and structured is not None:
        raise bad_request("use either response_format or structured_outputs, not both",
                          param="structured_outputs")
    if fmt is not None and fmt.type == "json_object":
        return Constraint("json_object")
    if fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise bad_request("response_format json_schema needs json_schema.schema",
                              param="response_format")
        return Constraint("json", fmt.json_schema.schema_)
    if structured is None:
        return None
    chosen = [(kind, value) for kind, value in (
        ("json", structured.json_), ("regex", structured.regex), ("choice", structured.choice),
        ("grammar", structured.grammar),
        ("json_object", structured.json_object or None)) if value is not None]
    if len(chosen) != 1:
        raise bad_request("structured_outputs needs exactly one of json, regex, choice, "
                          "grammar, json_object", param="structured_outputs")
    kind, value = chosen[0]
    return Constraint(kind, None if kind == "json_object" else value)


def _logit_bias(request: _SamplingFields, vocab_size: int) -> dict[int, float] | None:
    if not request.logit_bias:
        return None
    bias = {}
    for key, value in request.logit_bias.items():
        if not key.isdigit() or int(key) >= vocab_size:
            raise bad_request(f"logit_bias key {key!r} is not a token id of this model "
                              f"(0..{vocab_size - 1})", param="logit_bias")
        bias[int(key)] = value
    return bias


def _in_vocab(ids: list[int] | None, vocab_size: int, param: str) -> list[int] | None:
    if ids is None:
        return None
    if max(ids) >= vocab_size:
        raise bad_request(f"token id {max(ids)} is outside the vocabulary (size {vocab_size})",
                          param=param)
    return list(ids)
