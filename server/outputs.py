"""One sequence's output read as an assistant message: reasoning, content, tool calls.

The engine's own parsers (``server.parsing``) split reasoning from content and read
``tool_choice`` ``auto`` calls; a forced call (``required``, a named function) is read from
the content after the reasoning (``server.tools``), since constrained decoding applies
there, as in vLLM. Chat completions and the Responses API read outputs through this, whole
or streamed.
"""

from __future__ import annotations

from server.parsing import OutputParser, ParsedText
from server.tools import StreamingToolParser, ToolPlan, parse_tool_calls


class OutputReader:
    """Reads one sequence (``whole`` once, or ``delta`` per streamed output)."""

    def __init__(self, parser: OutputParser | None, plan: ToolPlan | None,
                 parallel_tool_calls: bool | None, include_reasoning: bool) -> None:
        self.parser = parser
        self.plan = plan if plan is not None and plan.parses else None
        self.single_call = parallel_tool_calls is False
        self.include_reasoning = include_reasoning
        self.forced = StreamingToolParser(plan) if self.plan is not None and \
            self.plan.forced else None
        self.called = False

    def whole(self, text: str, token_ids: list[int]) -> ParsedText:
        parsed = self.parser.parse(text, token_ids) if self.parser is not None \
            else ParsedText(content=text)
        if self.forced is not None:
            parsed.content, parsed.tool_calls = parse_tool_calls(self.plan,
                                                                 parsed.content or "")
        if self.single_call:
            parsed.tool_calls = parsed.tool_calls[:1]
        return self._finish(parsed)

    def delta(self, text: str, token_ids: list[int], finished: bool) -> ParsedText | None:
        """The next delta (None: nothing to send yet)."""
        if self.parser is None:
            parsed: ParsedText | None = ParsedText(content=text)
        else:
            parsed = self.parser.parse_delta(text, token_ids, finished)
        if self.forced is not None:
            parsed = parsed or ParsedText()
            content, calls = self.forced.feed(parsed.content or "")
            if finished:
                rest, more = self.forced.finish()
                content, calls = content + rest, calls + more
            parsed.content, parsed.tool_calls = content or None, calls
        if parsed is None:
            return None
        if self.single_call:  # vLLM's server keeps the first call's deltas
            parsed.tool_calls = [d for d in parsed.tool_calls if d.get("index", 0) == 0]
        parsed = self._finish(parsed)
        if not (parsed.reasoning or parsed.content or parsed.tool_calls):
            return None if self.parser is not None or self.forced is not None else parsed
        return parsed

    def _finish(self, parsed: ParsedText) -> ParsedText:
        if not self.include_reasoning:
            parsed.reasoning = None
        self.called = self.called or bool(parsed.tool_calls)
        return parsed

    def reasoning_tokens(self, token_ids: list[int]) -> int:
        """How many of a sequence's tokens are its reasoning (by the engine's parser)."""
        return 0 if self.parser is None else self.parser.count_reasoning_tokens(token_ids)

    def finish_reason(self, reason: str | None, whole: bool = False) -> str | None:
        """OpenAI's finish reason: ``tool_calls`` when ``auto`` or ``required`` called tools,
        ``stop`` for a named function; an abort is a ``stop``. As vLLM's server: a whole
        answer whose ``auto`` calls were read says ``tool_calls`` even when cut at its
        length, a stream only when the output stopped."""
        if reason is None:
            return None
        reason = "stop" if reason == "abort" else reason
        if self.plan is None or not self.called or self.plan.mode == "named":
            return reason
        if reason == "stop" or (whole and self.plan.mode == "auto"):
            return "tool_calls"
        return reason
