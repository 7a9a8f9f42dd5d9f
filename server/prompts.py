"""Requests to token ids: tokenization, chat templates and the model-dependent limits."""

from __future__ import annotations

from dataclasses import dataclass

from server.backends.base import ModelInfo
from server.errors import APIError, bad_request
from server.schemas import ChatCompletionRequest, CompletionRequest


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
        prompts = [Prompt(_encode(info, text, add_special_tokens=True), text) for text in texts]
    elif isinstance(raw[0], int):
        prompts = [Prompt(list(raw), None)]  # type: ignore[arg-type]
    else:
        prompts = [Prompt(list(ids), None) for ids in raw]  # type: ignore[union-attr]
    for prompt in prompts:
        check_prompt(info, prompt.token_ids, max(request.max_tokens or 0, 1), "prompt")
    return prompts


def chat_prompt(info: ModelInfo, request: ChatCompletionRequest) -> Prompt:
    messages = [{"role": m.role, "content": m.text()} for m in request.messages]
    try:
        text = info.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=request.add_generation_prompt
        )
    except Exception as error:  # template errors (e.g. roles it refuses) are the client's
        raise bad_request(f"messages do not fit the chat template: {error}", "messages") from error
    # The template already wrote any special tokens (as vLLM's own server does).
    return Prompt(_encode(info, text, add_special_tokens=False), text)


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
