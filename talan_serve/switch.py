"""The per-request TALAN switch: one wire format for the front end and every engine.

A request turns TALAN off with ``{"talan": {"enabled": false}}``: in the HTTP body, and
in its engine's per-request arguments (vLLM: ``SamplingParams.extra_args``; SGLang:
``custom_params``). In the engine arguments, ``{"talan": {"adapter": N}}`` also says which
loaded adapter (its adapter id) the request runs (default 0, a one-checkpoint server's);
the front end sets it from the request's ``model``. Everything that builds or reads that
value goes through this module: the front end's backends build it, the engine plugins
read it per batch row (``talan_serve.engine.requests``), and the prefix-cache keys are
derived from it. One parser, so no two places can disagree on what "off" means.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

KEY = "talan"
FIELDS = frozenset({"enabled", "adapter"})
DEFAULT_ADAPTER = 0
NO_ADAPTER = -1  # what a TALAN-off request runs: no side path


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
    adapter = value.get("adapter", DEFAULT_ADAPTER)
    if isinstance(adapter, bool) or not isinstance(adapter, int) or adapter < 0:
        raise SwitchError(f'"{KEY}.adapter" must be a non-negative integer, got {adapter!r}')
    return enabled


def parse_adapter(value: Any) -> int:
    """The adapter id a request runs for its ``talan`` value; ``NO_ADAPTER`` when off."""
    if not parse_switch(value):
        return NO_ADAPTER
    return (value or {}).get("adapter", DEFAULT_ADAPTER)


def adapter_in(engine_args: Mapping[str, Any] | None) -> int:
    """The adapter id a request whose engine arguments are ``engine_args`` runs (or
    ``NO_ADAPTER``); ``SwitchError`` if its ``talan`` value is malformed."""
    return parse_adapter((engine_args or {}).get(KEY))


def switch_args(enabled: bool, adapter: int | None = None) -> dict[str, Any]:
    """The engine arguments that switch TALAN on or off for one request (and, on a server
    of several adapters, choose its adapter)."""
    value: dict[str, Any] = {"enabled": bool(enabled)}
    if adapter is not None:
        value["adapter"] = int(adapter)
    return {KEY: value}
