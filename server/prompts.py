"""Requests to token ids: tokenization, chat templates and the model-dependent limits."""

from __future__ import annotations

from dataclasses import dataclass

from server.backends.base import ModelInfo
from server.errors import APIError, bad_request
from server.schemas import ChatCompletionRequest, CompletionRequest
from server.tools import message_for_template


@dataclass
class Prompt:
    token_ids: list[int]
    text: str | None  # as the client sent it, for echo; None for token-id prompts


def _encode(info: ModelInfo, text: str, add_special_tokens: bool) -> list[int]:
    try:
        return list(info.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)
    except Exception as error:  # the tokenizer rejects e.g. lone surrogates
        raise bad_request(f"prompt cannot be tokenized: {error}", param="prompt") from error


def completion_prompts(info: ModelInfo, request: CompletionRequest) -> list[Prompt]:
    raw = request.prompt
    if isinstance(raw, str):
        texts: list[str] | None = [raw]
    elif isinstance(raw[0], str):
        texts = list(raw)  # type: ignore[arg-type]
    else:
        texts = None
    if texts is not None:
        prompts = [Prompt(_encode(info, text, request.add_special_tokens), text)
                   for text in texts]
    elif isinstance(raw[0], int):
        prompts = [Prompt(list(raw), None)]  # type: ignore[arg-type]
    else:
        prompts = [Prompt(list(ids), None) for ids in raw]  # type: ignore[union-attr]
    prompts = [truncated(info, request, prompt) for prompt in prompts]
    for prompt in prompts:
        check_prompt(info, prompt.token_ids, max(request.max_tokens or 0, 1), "prompt")
    return prompts


def chat_prompt(info: ModelInfo, request: ChatCompletionRequest,
                tools: list[dict] | None = None) -> Prompt:
    if request.continue_final_message and request.add_generation_prompt:
        raise bad_request("continue_final_message needs add_generation_prompt: false",
                          param="continue_final_message")
    messages = [message_for_template(m) for m in request.messages]
    options = template_kwargs(request)
    if tools:
        options["tools"] = tools
    try:
        text = info.tokenizer.apply_chat_template(messages, tokenize=False, **options)
    except Exception as error:  # template errors (e.g. roles it refuses) are the client's
        raise bad_request(f"messages do not fit the chat template: {error}", "messages") from error
    # The template already wrote any special tokens (as vLLM's own server does).
    return truncated(info, request, Prompt(_encode(info, text, request.add_special_tokens), text))


def template_kwargs(request: ChatCompletionRequest) -> dict:
    """The chat template's arguments (what the engine's reasoning parser reads too):
    ``chat_template_kwargs``, the generation prompt, and ``reasoning_effort``, which also
    turns thinking off for ``none`` unless ``enable_thinking`` is given (as vLLM does)."""
    options = {**(request.chat_template_kwargs or {}),
               "add_generation_prompt": request.add_generation_prompt,
               "continue_final_message": request.continue_final_message}
    if request.reasoning_effort is not None:
        options["reasoning_effort"] = request.reasoning_effort
        options.setdefault("enable_thinking", request.reasoning_effort != "none")
    return options


def truncated(info: ModelInfo, request: CompletionRequest | ChatCompletionRequest,
              prompt: Prompt) -> Prompt:
    """``truncate_prompt_tokens``: keep that many tokens (-1: the context length), dropping
    them from ``truncation_side`` (default: the left, keeping the end of the prompt)."""
    keep = request.truncate_prompt_tokens
    if keep is None:
        return prompt
    keep = info.max_model_len if keep == -1 else keep
    if len(prompt.token_ids) <= keep:
        return prompt
    ids = prompt.token_ids
    ids = ids[len(ids) - keep:] if (request.truncation_side or "left") == "left" else ids[:keep]
    return Prompt(ids, None)  # echo decodes what was kept


def check_prompt(info: ModelInfo, token_ids: list[int], max_tokens: int, param: str) -> None:
    if not token_ids:
        raise bad_request("prompt is empty", param=param)
    if max(token_ids) >= info.vocab_size:
        raise bad_request(
            f"token id {max(token_ids)} is outside the vocabulary (size {info.vocab_size})",
            param=param,
        )
    if len(token_ids) + max_tokens > info.max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {info.max_model_len} tokens. However, "
            f"you requested {len(token_ids) + max_tokens} tokens ({len(token_ids)} in the "
            f"prompt, {max_tokens} for the completion). Please reduce the prompt or the "
            "completion length.",
            param=param,
            code="context_length_exceeded",
        )
