"""Reading reasoning and tool calls out of model text: the interface every engine's parsers
fill in, and which parser a chat template calls for.

Each engine ships a registry of output parsers (vLLM: ``ReasoningParserManager`` and
``ToolParserManager``; SGLang: ``ReasoningParser.DetectorMap`` and
``FunctionCallParser.ToolCallParserEnum``), and each backend supplies its own behind
``OutputParser`` (``server/backends/<engine>_parsers.py``), so that the two environments,
which never hold both engines, split outputs the way their engine's own server does.
Engine-neutral: text and token ids in, reasoning, content and OpenAI ``tool_calls`` out.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

REASONING = "reasoning"
TOOLS = "tools"


@dataclass
class ParsedText:
    """What a parser read out of model text: a whole output, or one streamed delta (then
    ``tool_calls`` are OpenAI delta entries with an ``index``)."""

    reasoning: str | None = None
    content: str | None = None
    tool_calls: list[dict] = field(default_factory=list)


@dataclass
class ParseRequest:
    """What one request's parsers need: the server's parsers (registry names; None: that
    kind is not parsed), whether this request's tool calls are read (``tool_choice``
    ``auto``), and the request as the chat template saw it. The engines' servers build
    their parsers from the server's choice whatever the request, so this does too."""

    reasoning: str | None
    tools: str | None
    tool_definitions: list[dict]
    messages: list[dict]
    chat_template_kwargs: dict[str, Any]
    prompt_token_ids: list[int]
    auto_tools: bool = False


class OutputParser(Protocol):
    """One sequence's parser (parsers keep streaming state: one per choice)."""

    def parse(self, text: str, token_ids: list[int]) -> ParsedText:
        """A finished output, whole."""
        ...

    def parse_delta(self, text: str, token_ids: list[int], finished: bool) -> ParsedText | None:
        """The next streamed delta; None when nothing can be sent yet."""
        ...

    def reasoning_ended(self) -> bool:
        """Whether the prompt already ended the reasoning (constrained decoding then
        applies from the first generated token)."""
        ...

    def skip_special_tokens(self) -> bool | None:
        """What the engine's own server detokenizes with when these parsers run (None:
        the request's own choice)."""
        ...

    def count_reasoning_tokens(self, token_ids: list[int]) -> int:
        """How many of an output's tokens are reasoning (usage's ``reasoning_tokens``)."""
        ...


class ParserRegistry(Protocol):
    """An engine's parsers: what it offers and how to build one."""

    def names(self, kind: str) -> tuple[str, ...]:
        """The registry's names of ``kind`` (``REASONING`` or ``TOOLS``)."""
        ...

    def for_family(self, kind: str, family: str) -> str | None:
        """The registry's name for a format family (``template_family``)."""
        ...

    def make(self, request: ParseRequest, tokenizer: Any) -> OutputParser: ...


def template_family(kind: str, chat_template: str | dict | None) -> str | None:
    """The format family a chat template writes reasoning or tool calls in, where that is
    unambiguous: reasoning ``qwen3`` (Qwen3's ``enable_thinking``) or ``deepseek_r1``
    (DeepSeek-R1's turn markers); tools ``hermes`` (``<tool_call>{...}</tool_call>``, Qwen2
    and Qwen3) or ``llama3_json`` (Llama 3's ``<|python_tag|>``). None otherwise."""
    if isinstance(chat_template, dict):  # named templates ("default", "tool_use", ...)
        chat_template = "\n".join(chat_template.values())
    if not chat_template:
        return None
    if kind == REASONING:
        if "<think>" not in chat_template and "</think>" not in chat_template:
            return None
        if "enable_thinking" in chat_template and "<|im_start|>" in chat_template:
            return "qwen3"
        if "<｜Assistant｜>" in chat_template:
            return "deepseek_r1"
        return None
    if "tools" not in chat_template:
        return None
    if "<tool_call>" in chat_template:
        return "hermes"
    if "python_tag" in chat_template or "ipython" in chat_template:
        return "llama3_json"
    return None


def new_call_id() -> str:
    """An OpenAI tool call id (for calls whose parser gave none)."""
    return f"call_{uuid.uuid4().hex[:24]}"


class ParserChoiceError(ValueError):
    """A parser name the engine's registry does not hold (a usage error at start)."""


def resolve_parser(kind: str, chosen: str | None, chat_template: str | dict | None,
                   registry: ParserRegistry) -> str | None:
    """The registry name a ``--reasoning-parser`` / ``--tool-call-parser`` choice comes to:
    ``auto`` reads the chat template, ``none`` (or None) turns parsing off."""
    if chosen in (None, "none"):
        return None
    if chosen == "auto":
        family = template_family(kind, chat_template)
        return None if family is None else registry.for_family(kind, family)
    names = registry.names(kind)
    if chosen not in names:
        flag = "--reasoning-parser" if kind == REASONING else "--tool-call-parser"
        raise ParserChoiceError(f"{flag} {chosen}: not in the engine's registry; choose auto, "
                                f"none or one of: {', '.join(sorted(names))}")
    return chosen


def merge_tool_deltas(deltas: Iterable[dict]) -> list[dict]:
    """Streamed ``tool_calls`` deltas assembled into whole calls, by ``index`` (what an
    OpenAI client does with them)."""
    calls: dict[int, dict] = {}
    for delta in deltas:
        call = calls.setdefault(delta["index"], {"id": None, "type": "function",
                                                 "function": {"name": "", "arguments": ""}})
        call["id"] = delta.get("id") or call["id"]
        function = delta.get("function") or {}
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""
    return [calls[index] for index in sorted(calls)]
