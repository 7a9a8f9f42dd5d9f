"""POST /tokenize and /detokenize: the served model's tokenizer, as vLLM's server has them."""

from __future__ import annotations

from typing import Any

from fastapi.responses import Response

from server.errors import bad_request
from server.http import parse
from server.prompts import chat_prompt
from server.schemas import (
    REFUSED,
    ChatCompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from server.state import ServerState
from server.tools import plan_tools


def tokenize(state: ServerState, body: Any) -> tuple[str | None, Response]:
    """``(model named in the body, response)``: a prompt, or chat ``messages``."""
    info = state.backend.info
    if isinstance(body, dict) and "messages" in body:
        chat = parse(ChatCompletionRequest, body, REFUSED["chat"])
        plan = plan_tools(chat, state.tool_parser)
        ids = chat_prompt(info, chat, plan.tools if plan else None).token_ids
        model, want_strs = chat.model, bool(body.get("return_token_strs") is True)
    else:
        request = parse(TokenizeRequest, body)
        try:
            ids = list(info.tokenizer(request.prompt,
                                      add_special_tokens=request.add_special_tokens).input_ids)
        except Exception as error:  # e.g. lone surrogates
            raise bad_request(f"prompt cannot be tokenized: {error}", param="prompt") from error
        model, want_strs = request.model, request.return_token_strs
    strs = info.tokenizer.convert_ids_to_tokens(ids) if want_strs else None
    response = TokenizeResponse(count=len(ids), max_model_len=info.max_model_len, tokens=ids,
                                token_strs=strs)
    return model, Response(response.model_dump_json(), media_type="application/json")


def detokenize(state: ServerState, body: Any) -> tuple[str | None, Response]:
    info = state.backend.info
    request = parse(DetokenizeRequest, body)
    if request.tokens and max(request.tokens) >= info.vocab_size:
        raise bad_request(f"token id {max(request.tokens)} is outside the vocabulary "
                          f"(size {info.vocab_size})", param="tokens")
    text = info.tokenizer.decode(request.tokens)
    return request.model, Response(DetokenizeResponse(prompt=text).model_dump_json(),
                                   media_type="application/json")
