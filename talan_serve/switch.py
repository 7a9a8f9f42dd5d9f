"""The per-request TALAN switch: one wire format for the front end and every engine.

A request turns TALAN off with ``{"talan": {"enabled": false}}``: in the HTTP body, and
in its engine's per-request arguments (vLLM: ``SamplingParams.extra_args``). Everything
that builds or reads that value goes through this module: the front end's backends build
it, the engine plugins parse it per batch row, and the prefix-cache patch keys cached
blocks by it. One parser, so no two places can disagree on what "off" means.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

KEY = "talan"
FIELDS = frozenset({"enabled"})


class SwitchError(ValueError):
    """A malformed switch value (refused at admission)."""


def parse_switch(value: Any) -> bool:
    """TALAN on/off from the ``talan`` value: absent or null is on.

    Anything but ``{"enabled": true|false}`` (or ``{}``) is refused, including an
    unknown key: a misspelt field must not silently leave TALAN on.
    """
    if value is None:
        return True
    if not isinstance(value, Mapping) or set(value) - FIELDS:
        raise SwitchError(f'"{KEY}" must be {{"enabled": true|false}}, got {value!r}')
    enabled = value.get("enabled", True)
    if not isinstance(enabled, bool):
        raise SwitchError(f'"{KEY}.enabled" must be a boolean, got {enabled!r}')
    return enabled


def enabled_in(extra_args: Mapping[str, Any] | None) -> bool:
    """TALAN on/off for a request whose engine arguments are ``extra_args``."""
    return parse_switch((extra_args or {}).get(KEY))


def switch_args(enabled: bool) -> dict[str, Any]:
    """The engine arguments that switch TALAN on or off for one request."""
    return {KEY: {"enabled": bool(enabled)}}
