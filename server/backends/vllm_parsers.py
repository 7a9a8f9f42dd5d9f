"""vLLM's reasoning and tool-call parsers behind ``server.parsing``'s interface.

The parsers are vLLM's own, composed the way vLLM's OpenAI server composes them
(``vllm.parser.ParserManager``: one ``Parser`` per sequence over a reasoning parser and a
tool parser) and called with the same arguments, so that an output splits here exactly as
it does in ``vllm serve``. vLLM's parsers read a vLLM request, so each request is also
written as one (its messages, tools and chat template arguments).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from server.parsing import REASONING, TOOLS, ParsedText, ParseRequest, new_call_id

# Format families (server.parsing.template_family) to vLLM's registry names.
_FAMILIES = {REASONING: {"qwen3": "qwen3", "deepseek_r1": "deepseek_r1"},
             TOOLS: {"hermes": "hermes", "llama3_json": "llama3_json"}}


@cache
def _parser_class(reasoning: str | None, tools: str | None) -> Any:
    from vllm.parser import ParserManager

    return ParserManager.get_parser(tool_parser_name=tools, reasoning_parser_name=reasoning,
                                    enable_auto_tools=tools is not None)


def _vllm_request(request: ParseRequest) -> Any:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    body: dict[str, Any] = {"model": "served", "messages": request.messages,
                            "chat_template_kwargs": request.chat_template_kwargs}
    if request.tool_definitions:
        body.update(tools=request.tool_definitions,
                    tool_choice="auto" if request.auto_tools else "none")
    return ChatCompletionRequest.model_validate(body)


def _tool_call(call: Any) -> dict:
    return {"id": call.id or new_call_id(), "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


class VllmOutputParser:
    """One sequence's vLLM ``Parser`` (``server.parsing.OutputParser``)."""

    def __init__(self, request: ParseRequest, tokenizer: Any) -> None:
        self.request = request
        self.vllm_request = _vllm_request(request)
        self.parser = _parser_class(request.reasoning, request.tools)(
            tokenizer, self.vllm_request.tools,
            chat_template_kwargs=request.chat_template_kwargs)

    def _adjusted(self) -> Any:
        # vLLM's server lets its parsers adjust the request (they keep special tokens in
        # the text when they read them; some bring their own grammar). Only the effects
        # below are taken from it: the request is adjusted on a copy.
        request = self.vllm_request.model_copy()
        for parser in (self.parser.reasoning_parser, self.parser.tool_parser):
            if parser is not None:
                request = parser.adjust_request(request)
        return request

    def reasoning_ended(self) -> bool:
        # What vLLM's server tells its engine (ChatCompletionRequest.resolve_reasoning_ended).
        return bool(self._adjusted().resolve_reasoning_ended(
            self.parser, self.request.prompt_token_ids))

    def skip_special_tokens(self) -> bool | None:
        return None if self._adjusted().skip_special_tokens else False

    def count_reasoning_tokens(self, token_ids: list[int]) -> int:
        return int(self.parser.count_reasoning_tokens(token_ids))

    def parse(self, text: str, token_ids: list[int]) -> ParsedText:
        self.parser.set_prompt_token_ids(self.request.prompt_token_ids)
        # As vLLM's server with --enable-auto-tool-choice: the request's tool_choice says
        # whether calls are read.
        reasoning, content, calls = self.parser.parse(
            text, self.vllm_request, enable_auto_tools=self.request.tools is not None,
            model_output_token_ids=token_ids)
        return ParsedText(reasoning, content, [_tool_call(c) for c in calls or []])

    def parse_delta(self, text: str, token_ids: list[int], finished: bool) -> ParsedText | None:
        delta = self.parser.parse_delta(text, list(token_ids), self.vllm_request,
                                        prompt_token_ids=self.request.prompt_token_ids,
                                        finished=finished)
        if delta is None:
            return None
        calls = [call.model_dump(exclude_none=True) for call in delta.tool_calls]
        return ParsedText(delta.reasoning, delta.content, calls)


class VllmParsers:
    """vLLM's registries (``server.parsing.ParserRegistry``)."""

    def names(self, kind: str) -> tuple[str, ...]:
        from vllm.reasoning import ReasoningParserManager
        from vllm.tool_parsers import ToolParserManager

        manager = ReasoningParserManager if kind == REASONING else ToolParserManager
        return tuple(manager.list_registered())

    def for_family(self, kind: str, family: str) -> str | None:
        return _FAMILIES[kind].get(family)

    def make(self, request: ParseRequest, tokenizer: Any) -> VllmOutputParser:
        return VllmOutputParser(request, tokenizer)
