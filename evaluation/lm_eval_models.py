"""lm-eval's OpenAI-compatible models with TALAN's per-request switch in every request.

``talan-completions`` and ``talan-chat-completions`` are lm-eval's ``local-completions``
and ``local-chat-completions`` plus one model argument, ``talan``: ``on`` or ``off`` puts
``{"talan": {"enabled": ...}}`` into each request body; ``default`` (or unset) leaves the
server's default. Registered when this module is imported.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI

from talan_serve.switch import switch_args

SWITCH_VALUES = {"on": True, "off": False, "default": None}


def _switch(value: str | bool | None) -> dict[str, Any]:
    if isinstance(value, bool):
        return switch_args(value)
    if value not in SWITCH_VALUES:
        raise ValueError(f"talan={value!r}: use one of {', '.join(SWITCH_VALUES)}")
    enabled = SWITCH_VALUES[value]
    return {} if enabled is None else switch_args(enabled)


class _TalanSwitch:
    """The ``talan`` model argument, added to every request body."""

    def __init__(self, talan: str | bool | None = "default", **kwargs: Any) -> None:
        self.talan_args = _switch(talan)
        super().__init__(**kwargs)

    def _create_payload(self, *args: Any, **kwargs: Any) -> dict:
        return {**super()._create_payload(*args, **kwargs), **self.talan_args}


@register_model("talan-completions")
class TalanCompletions(_TalanSwitch, LocalCompletionsAPI):
    pass


@register_model("talan-chat-completions")
class TalanChatCompletions(_TalanSwitch, LocalChatCompletion):
    pass
