"""``Backend``: the one interface between the HTTP front end and an inference engine.

The front end tokenizes, validates and formats; a backend only turns token ids plus
sampling options into a stream of per-sequence deltas. Every backend fills in one template
(``server/backends/template.py``) with its engine's calls and policy; the TALAN plugin
that runs inside that engine is ``talan_serve/plugins/<engine>/`` (docs/design.md, "The
seam"). This module holds the interface and what crosses it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from server.adapters import AdapterRegistry, ServedAdapters
from server.parsing import OutputParser, ParseRequest


class EngineInputError(ValueError):
    """The engine rejected a request's parameters (answered as HTTP 400)."""


class EngineDeadError(RuntimeError):
    """The engine cannot serve any more requests (answered as HTTP 503)."""


@dataclass
class Constraint:
    """Structured output: what the engine's constrained decoding must produce.

    ``kind`` is ``json`` (``value``: a JSON schema), ``json_object`` (any JSON object),
    ``regex``, ``choice`` (``value``: the allowed strings) or ``grammar`` (EBNF).
    """

    kind: str
    value: Any = None


@dataclass
class SamplingOptions:
    """Engine-neutral sampling knobs (OpenAI / vLLM names; validated by the front end)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    n: int = 1
    logprobs: int | None = None  # top-k alternatives per generated token
    prompt_logprobs: int | None = None  # top-k alternatives per prompt token (echo)
    ignore_eos: bool = False
    constraint: Constraint | None = None
    talan_enabled: bool = True  # per-request TALAN off switch
    # On a server with a reasoning parser (ModelInfo.reasoning_parser), the engine applies
    # ``constraint`` to what follows the reasoning; ``reasoning_ended``: the prompt already
    # ended it (constrain from the first token). ``reasoning_kwargs``: the chat template's
    # arguments, which the engine's own parser reads (``enable_thinking``).
    reasoning_ended: bool | None = None
    reasoning_kwargs: dict[str, Any] | None = None


@dataclass
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingOptions
    cache_salt: str | None = None  # keeps this request's prefix-cache entries apart
    # False: the client takes the whole answer at once, so an engine may skip per-step
    # outputs and yield only the final one (less front-end work per decode step).
    stream: bool = True
    # The request's ``model``: on a server of many adapters, the adapter it runs (the
    # base model's name or None: the base model alone).
    model: str | None = None


@dataclass
class TokenLogprob:
    logprob: float
    rank: int | None
    text: str


# One position: {token_id: logprob}; holds the sampled token and the top-k alternatives.
PositionLogprobs = dict[int, TokenLogprob]


@dataclass
class SequenceDelta:
    """What one of the ``n`` sequences produced since the previous output."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None (running)


@dataclass
class GenerateOutput:
    request_id: str
    sequences: list[SequenceDelta]
    finished: bool
    # Set on the first output only; position 0 is None (nothing predicts the first token).
    prompt_logprobs: list[PositionLogprobs | None] | None = None


@dataclass
class ModelInfo:
    name: str
    max_model_len: int
    tokenizer: Any  # a transformers tokenizer (chat template, encode/decode)
    vocab_size: int
    talan: bool  # whether a TALAN checkpoint is loaded (per-request switch is meaningful)
    dtype: str  # the engine's compute dtype ("float32", "bfloat16", ...)
    lora_mode: str | None = None  # the checkpoint's LoRA: "merged", "per_request", or None
    engine: str = ""  # "vllm", ...
    engine_version: str = ""
    # The engine's output parsers this server runs (their registry names; None: none).
    reasoning_parser: str | None = None
    tool_parser: str | None = None


class Backend(Protocol):
    info: ModelInfo
    # A server of many adapters' loads, unloads and routes (``server.adapters``); else None.
    served_adapters: ServedAdapters | None

    @property
    def registry(self) -> AdapterRegistry | None:
        """The named adapters of a server of many (``server.adapters``); else None."""
        ...

    async def start(self) -> None:
        """Load the adapters given at start (before the server takes requests)."""
        ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """Yield deltas until an output with ``finished=True``; may raise EngineInputError."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its engine resources; a no-op for unknown ids."""
        ...

    async def health(self) -> None:
        """Return if the engine can serve; raise EngineDeadError otherwise."""
        ...

    def num_unfinished(self) -> int:
        """Requests the engine holds (waiting or running): 0 when idle, for leak checks."""
        ...

    async def load_adapter(self, name: str, path: str, within: Path | None = None) -> None:
        """Serve the checkpoint at ``path`` (its files inside ``within``, when given) as
        ``name``; ``AdapterError`` if it cannot."""
        ...

    async def unload_adapter(self, name: str) -> None:
        """Stop serving ``name`` once its running requests end; ``ModelNotFoundError``."""
        ...

    def output_parser(self, request: ParseRequest) -> OutputParser:
        """One sequence's reader of reasoning and tool calls, by the engine's own parsers."""
        ...

    async def shutdown(self) -> None: ...
