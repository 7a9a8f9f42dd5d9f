"""SGLang's reasoning and tool-call parsers behind ``server.parsing``'s interface.

The parsers are SGLang's own (``ReasoningParser`` over its detector map, then
``FunctionCallParser`` over its tool-call detectors on the text after the reasoning), used
the way SGLang's OpenAI server uses them: a reasoning model is in its reasoning from the
first token unless the request turns thinking off (``chat_template_kwargs``), and the
tool-call parser reads what the reasoning parser passes on.
"""

from __future__ import annotations

from typing import Any

from server.parsing import REASONING, ParsedText, ParseRequest, new_call_id

# Format families (server.parsing.template_family) to SGLang's registry names.
_FAMILIES = {REASONING: {"qwen3": "qwen3", "deepseek_r1": "deepseek-r1"},
             "tools": {"hermes": "hermes", "llama3_json": "llama3"}}


def _thinking(request: ParseRequest, detector: Any) -> bool:
    """Whether the output starts inside the reasoning (SGLang's server decides it from the
    detector's default and the request's template switch)."""
    mode = getattr(detector, "reasoning_default", None)
    if mode == "always" or getattr(detector, "force_reasoning", False):
        return True
    kwargs = request.chat_template_kwargs
    if mode in ("thinking", "enable_thinking"):
        return kwargs.get(mode) is not False
    if mode in ("explicit_thinking", "explicit_enable_thinking"):
        return kwargs.get(mode.removeprefix("explicit_")) is True
    return False


def _sglang_request(request: ParseRequest) -> Any:
    from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest

    return ChatCompletionRequest.model_validate(
        {"model": "served", "messages": request.messages,
         "chat_template_kwargs": request.chat_template_kwargs})


class SglangOutputParser:
    """One sequence's SGLang parsers (``server.parsing.OutputParser``)."""

    def __init__(self, request: ParseRequest, tokenizer: Any) -> None:
        from sglang.srt.entrypoints.openai.protocol import Tool
        from sglang.srt.function_call.function_call_parser import FunctionCallParser
        from sglang.srt.parser.reasoning_parser import ReasoningParser

        self.request = request
        self.tokenizer = tokenizer
        self.reasoning = None
        self.tools = None
        self._sent_calls: set[int] = set()
        if request.reasoning is not None:
            default = ReasoningParser(request.reasoning, tokenizer=tokenizer).detector
            self._force = _thinking(request, default)
            self.reasoning = ReasoningParser(
                request.reasoning, stream_reasoning=True, force_reasoning=self._force,
                request=_sglang_request(request), tokenizer=tokenizer,
                tool_call_parser_active=request.tools is not None and request.auto_tools)
        if request.tools is not None and request.auto_tools:
            tools = [Tool.model_validate(t) for t in request.tool_definitions]
            self.tools = FunctionCallParser(tools, request.tools, tokenizer=tokenizer)

    def reasoning_ended(self) -> bool:
        # SGLang constrains from the first token unless the request reasons first.
        return self.reasoning is None or not self._force

    def skip_special_tokens(self) -> bool | None:
        return None

    def count_reasoning_tokens(self, token_ids: list[int]) -> int:
        # The tokens up to the end of the reasoning (all of them while it has not ended).
        if self.reasoning is None or not self._force:
            return 0
        end = self.reasoning.detector.get_think_end_token_ids(self.tokenizer)
        for start in range(len(token_ids) - len(end) + 1):
            if end and token_ids[start:start + len(end)] == end:
                return start
        return len(token_ids)

    def parse(self, text: str, token_ids: list[int]) -> ParsedText:
        reasoning = None
        if self.reasoning is not None:
            reasoning, text = self.reasoning.parse_non_stream(text)
        calls: list[dict] = []
        if self.tools is not None and self.tools.has_tool_call(text):
            text, items = self.tools.parse_non_stream(text)
            calls = [_whole_call(item) for item in items]
        return ParsedText(reasoning or None, text or None, calls)

    def parse_delta(self, text: str, token_ids: list[int], finished: bool) -> ParsedText | None:
        reasoning, content = None, text
        if self.reasoning is not None:
            reasoning, content = self.reasoning.parse_stream_chunk(text)
            if finished:
                more_reasoning, more_content = self.reasoning.parse_stream_end()
                reasoning = (reasoning or "") + (more_reasoning or "")
                content = (content or "") + (more_content or "")
        calls: list[dict] = []
        if self.tools is not None and (content or finished):
            content, items = self.tools.parse_stream_chunk(content or "")
            if finished:
                end_text, end_items = self.tools.parse_stream_end()
                content, items = (content or "") + end_text, [*items, *end_items]
            calls = [self._delta_call(item) for item in items]
        if not reasoning and not content and not calls:
            return None
        return ParsedText(reasoning or None, content or None, calls)

    def _delta_call(self, item: Any) -> dict:
        delta: dict[str, Any] = {"index": item.tool_index, "function": {
            "arguments": item.parameters}}
        if item.name:  # the first delta of a call names it, with its id
            delta.update(id=new_call_id(), type="function")
            delta["function"]["name"] = item.name
        return delta


def _whole_call(item: Any) -> dict:
    return {"id": new_call_id(), "type": "function",
            "function": {"name": item.name, "arguments": item.parameters}}


class SglangParsers:
    """SGLang's registries (``server.parsing.ParserRegistry``)."""

    def names(self, kind: str) -> tuple[str, ...]:
        if kind == REASONING:
            from sglang.srt.parser.reasoning_parser import ReasoningParser

            return tuple(ReasoningParser.DetectorMap)
        from sglang.srt.function_call.function_call_parser import FunctionCallParser

        return tuple(FunctionCallParser.ToolCallParserEnum)

    def for_family(self, kind: str, family: str) -> str | None:
        return _FAMILIES[kind].get(family)

    def make(self, request: ParseRequest, tokenizer: Any) -> SglangOutputParser:
        return SglangOutputParser(request, tokenizer)
