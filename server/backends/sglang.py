"""SGLang (``sglang.Engine``) behind the ``Backend`` protocol: its engine calls and policy.

The front end hands over token ids; SGLang's tokenizer manager (in this process) and its
scheduler and detokenizer (child processes) schedule, batch, detokenize and compute
logprobs. This is the front end's one SGLang module, and it uses SGLang's engine API
(``Engine``, its tokenizer manager's requests and aborts); the TALAN plugin inside SGLang
is ``talan_serve.plugins.sglang``. Fields SGLang has no meaning for are refused here by
name, as the ``Backend`` protocol asks. The rest of the backend is the template
(``server/backends/template.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from server.adapters import AdapterError, EngineAdapter, RequestRoute
from server.backends.base import (
    EngineDeadError,
    EngineInputError,
    GenerateOutput,
    GenerateRequest,
    PositionLogprobs,
    SamplingOptions,
    SequenceDelta,
    TokenLogprob,
)
from server.backends.sglang_loras import ResidentLoras
from server.backends.sglang_parsers import SglangParsers
from server.backends.template import (
    BackendConfig,
    EngineBackend,
    EngineFacts,
    EngineLaunch,
    FullText,
    UsageError,
    has_gpu,
)
from talan_serve.adapter_files import AdapterWeights
from talan_serve.plugins.sglang.rpc import failed_changes
from talan_serve.switch import switch_args

logger = logging.getLogger(__name__)

LORA_NAME = "talan"
# Entries of SGLang's state pool (one per running request, plus radix-cache snapshots):
# left to SGLang, the pool takes about half of the memory left after the weights.
POOL_ENTRIES_PER_REQUEST = 4
# Requests SGLang runs at once unless --max-num-seqs says otherwise.
MAX_RUNNING_REQUESTS = {"gpu": 256, "cpu": 64}


def engine_kwargs(config: BackendConfig, launch: EngineLaunch,
                  reasoning_parser: str | None = None) -> dict:
    """``sglang.Engine`` arguments for the engine-neutral settings and what to load
    (``reasoning_parser``: the one the server runs, which constrained decoding waits for)."""
    gpu = has_gpu()
    max_running = config.max_num_seqs or MAX_RUNNING_REQUESTS["gpu" if gpu else "cpu"]
    kwargs: dict[str, Any] = dict(
        model_path=str(launch.model_path),
        served_model_name=config.served_name,
        dtype=config.dtype,
        random_seed=config.seed,
        tp_size=config.tensor_parallel_size,
        pp_size=config.pipeline_parallel_size,
        dp_size=config.data_parallel_size,
        max_running_requests=max_running,
        max_mamba_cache_size=max_running * POOL_ENTRIES_PER_REQUEST,
        # Each streamed output carries only what is new (tokens, text, logprobs).
        incremental_streaming_output=True,
        # Compact JSON under a JSON constraint, as on vLLM: a model cannot spend its
        # max_tokens on whitespace and stop mid-document.
        constrained_json_disable_any_whitespace=True,
        log_level="warning",
    )
    if not gpu:
        kwargs.update(device="cpu", attention_backend="torch_native")
        # SGLang's CPU default reserves most of the memory for the KV cache.
        kwargs["max_total_tokens"] = (config.max_model_len or 4096) * 4
    if config.max_model_len is not None:
        kwargs["context_length"] = config.max_model_len
    if config.max_num_batched_tokens is not None:
        kwargs["chunked_prefill_size"] = config.max_num_batched_tokens
    if config.gpu_memory_utilization is not None:
        kwargs["mem_fraction_static"] = config.gpu_memory_utilization
    if config.enforce_eager:
        kwargs["disable_cuda_graph"] = True
    if config.deterministic:
        if gpu:
            kwargs["enable_deterministic_inference"] = True
        else:
            # No batch-invariant kernels on CPU: one sequence at a time, and no radix
            # cache (a cached prefix would change how the rest of the prompt is chunked).
            kwargs.update(max_running_requests=1, disable_radix_cache=True)
    if launch.lora_dir is not None:  # one checkpoint's LoRA, per request
        kwargs.update(enable_lora=True, lora_paths=[f"{LORA_NAME}={launch.lora_dir}"],
                      max_loras_per_batch=1)
    elif launch.lora_rank is not None:  # room for the LoRAs of a server of many adapters
        # SGLang's LoRA buffers hold the base model's "no LoRA" as one more adapter.
        kwargs.update(enable_lora=True, max_lora_rank=launch.lora_rank,
                      lora_target_modules=["all"], max_loras_per_batch=config.max_adapters + 1)
    if kwargs.get("enable_lora") and not gpu:
        kwargs["lora_backend"] = "torch_native"
    if reasoning_parser is not None:
        # A reasoning model's constraint applies to what follows its reasoning, as in
        # SGLang's server (its grammar backend waits for the end of the reasoning).
        kwargs["reasoning_parser"] = reasoning_parser
    kwargs.update(config.extra_engine_args)
    return kwargs


def sampling_params(options: SamplingOptions, seed: int | None,
                    talan_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """SGLang's sampling parameters for the engine-neutral options (TALAN switch included;
    ``talan_args``: the switch with an adapter, on a server of many)."""
    for field, unset in (("allowed_token_ids", None), ("bad_words", None)):
        if getattr(options, field) != unset:
            raise EngineInputError(f"'{field}' is not supported by the sglang engine")
    params: dict[str, Any] = dict(
        max_new_tokens=options.max_tokens,
        min_new_tokens=options.min_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k if options.top_k > 0 else -1,
        min_p=options.min_p,
        presence_penalty=options.presence_penalty,
        frequency_penalty=options.frequency_penalty,
        repetition_penalty=options.repetition_penalty,
        stop=list(options.stop) or None,
        stop_token_ids=list(options.stop_token_ids) or None,
        ignore_eos=options.ignore_eos,
        skip_special_tokens=options.skip_special_tokens,
        spaces_between_special_tokens=options.spaces_between_special_tokens,
        no_stop_trim=options.include_stop_str_in_output,
        sampling_seed=seed,
        custom_params=talan_args or switch_args(options.talan_enabled),
    )
    if options.logit_bias:
        params["logit_bias"] = {str(k): v for k, v in options.logit_bias.items()}
    constraint = options.constraint
    if constraint is not None:
        import json

        if constraint.kind == "json":
            value = constraint.value
            params["json_schema"] = value if isinstance(value, str) else json.dumps(value)
        elif constraint.kind == "json_object":
            params["json_schema"] = json.dumps({"type": "object"})
        elif constraint.kind == "regex":
            params["regex"] = constraint.value
        elif constraint.kind == "choice":
            params["regex"] = "(" + "|".join(re.escape(c) for c in constraint.value) + ")"
        else:
            params["ebnf"] = constraint.value
    return params


def _position(entries: list | None, chosen: tuple | None) -> PositionLogprobs | None:
    """One position's logprobs from SGLang's ``(logprob, token_id, text)`` tuples."""
    if chosen is None or chosen[0] is None:
        return None
    position: PositionLogprobs = {}
    for rank, (logprob, token_id, text) in enumerate(entries or [], start=1):
        position[token_id] = TokenLogprob(logprob, rank, text or "")
    logprob, token_id, text = chosen
    if token_id not in position:
        position[token_id] = TokenLogprob(logprob, None, text or "")
    return position


def _logprobs(meta: dict, kind: str) -> list[PositionLogprobs | None] | None:
    chosen = meta.get(f"{kind}_token_logprobs")
    if chosen is None:
        return None
    top = meta.get(f"{kind}_top_logprobs") or [None] * len(chosen)
    return [_position(entries, entry) for entry, entries in zip(chosen, top, strict=True)]


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class SglangBackend(EngineBackend):
    """``Backend`` over SGLang's ``Engine`` (scheduler and detokenizer in child processes)."""

    engine = "sglang"
    engine_module = "sglang"
    setup_hint = ("set up its own environment with ./scripts/setup_sglang.sh, then run "
                  ".venv-sglang/bin/talan-serve --engine sglang")

    @classmethod
    def configure(cls, args: argparse.Namespace) -> None:
        super().configure(args)
        if args.distributed_executor_backend not in (None, "mp"):
            raise UsageError(f"--distributed-executor-backend "
                             f"{args.distributed_executor_backend} is vLLM's; the sglang "
                             "engine starts its own processes (multi-node: SGLang's "
                             "--nnodes/--node-rank, see its docs)")
        if (args.adapters or args.talan_connection_points or args.adapter_dir) \
                and args.pipeline_parallel_size > 1:
            # SGLang keeps each request's one state under one decoder layer's id, which a
            # single pipeline stage holds; adapters at several points would span stages.
            raise UsageError("--adapters with --engine sglang and --pipeline-parallel-size: "
                             "serve many adapters on one pipeline stage (tensor "
                             "parallelism is fine), or use --engine vllm")

    @classmethod
    def parsers(cls) -> SglangParsers:
        return SglangParsers()

    def lora_handle(self, lora_dir: Path) -> Any:
        return LORA_NAME  # a request names its LoRA

    def start_engine(self, launch: EngineLaunch) -> EngineFacts:
        if not has_gpu():
            os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
        import sglang

        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        self._engine = sglang.Engine(**engine_kwargs(self.config, launch,
                                                     self.reasoning_parser))
        # SGLang's engine configures this process's root logger for itself (its format,
        # its level: warning): the server's --log-level and format are put back.
        root.handlers[:] = handlers
        root.setLevel(level)
        self._manager = self._engine.tokenizer_manager
        self._dead: str | None = None
        self._changes: list[tuple[list, asyncio.Future]] = []  # for the next call
        self._sender: asyncio.Task | None = None
        self._resident = ResidentLoras()
        self._sweeps: set[asyncio.Task] = set()
        model_config = self._manager.model_config
        return EngineFacts(max_model_len=model_config.context_len,
                           vocab_size=model_config.vocab_size,
                           dtype=str(model_config.dtype).removeprefix("torch."),
                           version=sglang.__version__)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        options = request.sampling
        async with self.routed(request) as route:
            # n samples = n requests (seeds seed, seed + 1, ...), merged in arrival order.
            streams = [self._one(request, index, route) for index in range(options.n)]
            if len(streams) == 1:
                async for output in streams[0]:
                    yield output
            else:
                async for output in self._merged(streams):
                    yield output

    async def _merged(self, streams: list) -> AsyncIterator[GenerateOutput]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(stream) -> None:
            try:
                async for output in stream:
                    await queue.put(output)
            except BaseException as error:  # noqa: B036 - forwarded to the consumer
                await queue.put(error)
            await queue.put(None)

        tasks = [asyncio.create_task(pump(s)) for s in streams]
        remaining, first, finished = len(tasks), True, 0
        try:
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                if not first:
                    item.prompt_logprobs = None
                first = False
                finished += item.finished
                item.finished = finished == len(tasks)  # the request: every sample done
                yield item
        finally:
            for task in tasks:
                task.cancel()

    def _rid(self, request: GenerateRequest, index: int) -> str:
        return request.request_id if request.sampling.n == 1 else \
            f"{request.request_id}-s{index}"

    async def _one(self, request: GenerateRequest, index: int,
                   route: RequestRoute) -> AsyncIterator[GenerateOutput]:
        from sglang.srt.managers.io_struct import GenerateReqInput

        options = request.sampling
        seed = None if options.seed is None else options.seed + index
        try:
            params = sampling_params(options, seed, route.talan_args)
        except (ValueError, TypeError) as error:
            raise EngineInputError(str(error)) from error
        top = max(options.logprobs or 0, options.prompt_logprobs or 0)
        want_logprobs = options.logprobs is not None or options.prompt_logprobs is not None
        obj = GenerateReqInput(
            input_ids=request.prompt_token_ids, sampling_params=params, stream=True,
            rid=self._rid(request, index), return_logprob=want_logprobs,
            top_logprobs_num=top if want_logprobs else None,
            logprob_start_len=0 if options.prompt_logprobs is not None else -1,
            return_text_in_logprobs=True,
            lora_path=route.lora, cache_salt=request.cache_salt,
            # The grammar (if any) waits for the end of the reasoning, as in SGLang's server.
            require_reasoning=self.reasoning_parser is not None
            and options.reasoning_ended is False,
        )
        text = FullText(self.info.tokenizer, options)
        first = True
        try:
            async for out in self._manager.generate_request(obj, None):
                meta = out["meta_info"]
                reason = (meta.get("finish_reason") or {}).get("type")
                delta_ids = list(out.get("output_ids") or [])
                delta = SequenceDelta(
                    index=index, token_ids=delta_ids, text=out.get("text") or "",
                    logprobs=_logprobs(meta, "output") if options.logprobs is not None
                    else None,
                    finish_reason=reason,
                )
                text.add(delta)
                prompt = None
                if first and options.prompt_logprobs is not None:
                    prompt = _logprobs(meta, "input")
                first = False
                yield GenerateOutput(request.request_id, [delta], reason is not None, prompt)
        except ValueError as error:  # SGLang's admission checks (sampling params, lengths)
            raise EngineInputError(str(error)) from error
        except (ConnectionError, EOFError, BrokenPipeError) as error:
            self._dead = str(error) or type(error).__name__
            raise EngineDeadError(self._dead) from error

    async def abort(self, request_id: str) -> None:
        for rid in [request_id, *(r for r in list(self._manager.rid_to_state)
                                  if r.startswith(f"{request_id}-s"))]:
            self._manager.abort_request(rid)

    async def health(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        for pid in self._engine.get_all_child_pids():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                self._dead = f"SGLang process {pid} is gone"
                raise EngineDeadError(self._dead) from None

    def num_unfinished(self) -> int:
        return len(self._manager.rid_to_state)

    async def shutdown(self) -> None:
        self._engine.shutdown()

    # --- AdapterEngine: TALAN blocks through the schedulers' RPC methods
    # (talan_serve.plugins.sglang.rpc), LoRAs through SGLang's dynamic LoRA loading -------

    async def _rpc(self, method: str, **kwargs: Any) -> None:
        try:
            # A blocking round trip to every scheduler (SGLang's engine API).
            await asyncio.to_thread(self._engine.collective_rpc, method, **kwargs)
        except AssertionError as error:  # SGLang reports a failed call this way
            raise AdapterError(str(error) or f"{method} failed in the engine") from error

    async def _talan(self, remove: int | None, add: list | None = None) -> None:
        """One change to the TALAN blocks (``talan_apply_changes``), in the schedulers'
        next call: the engine's RPC socket takes one call at a time (a send, then its
        answer), so the changes asked for while a call is under way go together in the
        next one, and loads waiting together wait for one gap between steps, not one
        each. A cancelled caller's change still goes."""
        done = asyncio.get_running_loop().create_future()
        done.add_done_callback(_retrieved)  # its caller may have gone
        self._changes.append(([remove, add], done))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_changes())
        await asyncio.shield(done)

    async def _send_changes(self) -> None:
        while self._changes:
            batch, self._changes = self._changes, []
            try:
                await self._rpc("talan_apply_changes",
                                changes=[change for change, _ in batch])
            except asyncio.CancelledError:
                for _, done in batch:
                    done.cancel()
                raise
            except Exception as error:  # each change's own failure, or the whole call's
                failed = failed_changes(str(error)) if isinstance(error, AdapterError) \
                    else None
                for index, (_, done) in enumerate(batch):
                    if failed is None:
                        done.set_exception(error)
                    elif index in failed:
                        done.set_exception(AdapterError(failed[index]))
                    else:
                        done.set_result(None)
            else:
                for _, done in batch:
                    done.set_result(None)

    async def load(self, name: str, adapter_id: int, weights: AdapterWeights,
                   evicting: EngineAdapter | None = None) -> Any:
        # SGLang's LoRAs are its tokenizer manager's, TALAN blocks the schedulers': the two
        # parts go at once, so that the scheduler serves them in the same gap between two
        # steps (it reads both its sockets there); the TALAN part, an eviction's removal
        # with it, is one change (``_talan``). The evicted adapter's LoRA stays loaded
        # while its weights live (server/backends/sglang_loras.py); one loaded from these
        # weights is reused.
        remove = evicting.adapter_id if evicting is not None and evicting.has_talan else None
        add = ([adapter_id, weights.config.to_dict(), weights.talan_file]
               if weights.has_talan else None)
        resident = self._resident.find(weights) if weights.has_lora else None

        async def talan() -> None:
            if remove is not None or add is not None:
                await self._talan(remove, add)

        async def lora() -> str | None:
            if resident is not None or not weights.has_lora:
                return resident
            handle = await self._load_lora(name, self._resident.new_handle(name), weights)
            self._resident.add(handle, weights)
            return handle

        talan_done, handle = await asyncio.gather(talan(), lora(), return_exceptions=True)
        if isinstance(talan_done, BaseException) or isinstance(handle, BaseException):
            # Nothing of the new adapter stays: take back the part that went in (a reused
            # LoRA stays, as it was).
            if not isinstance(talan_done, BaseException) and add is not None:
                await self._talan(adapter_id)
            if not isinstance(handle, BaseException) and handle not in (None, resident):
                self._resident.discard(handle)
                await self._unload_lora(handle)
            raise talan_done if isinstance(talan_done, BaseException) else handle
        self._unload_orphans()
        return handle

    def _unload_orphans(self) -> None:
        """Unload, after this load, the LoRAs whose weights are gone (no load waits)."""
        for handle in self._resident.orphans():
            task = asyncio.create_task(self._unload_lora(handle))
            self._sweeps.add(task)
            task.add_done_callback(self._swept)

    def _swept(self, task: asyncio.Task) -> None:
        self._sweeps.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("%s", task.exception())

    async def unload(self, adapter: EngineAdapter) -> None:
        parts = []
        if adapter.has_talan:
            parts.append(self._talan(adapter.adapter_id))
        if adapter.lora is not None:
            self._resident.discard(adapter.lora)
            parts.append(self._unload_lora(adapter.lora))
        await asyncio.gather(*parts)

    async def _load_lora(self, name: str, handle: str, weights: AdapterWeights) -> str:
        from sglang.srt.managers.io_struct import LoadLoRAAdapterFromTensorsReqInput
        from sglang.srt.utils import MultiprocessingSerializer

        # The validated LoRA, decoded, one serialized copy per tensor-parallel rank (as
        # sglang.Engine.load_lora_adapter_from_tensors sends them).
        payload = await asyncio.to_thread(
            lambda: MultiprocessingSerializer.serialize(weights.lora))
        result = await self._manager.load_lora_adapter_from_tensors(
            LoadLoRAAdapterFromTensorsReqInput(
                lora_name=handle, config_dict=weights.lora_config,
                serialized_named_tensors=[payload] * self.config.tensor_parallel_size),
            None)
        if not result.success:
            raise AdapterError(f"adapter {name!r}: SGLang refused its LoRA: "
                               f"{result.error_message}")
        return handle

    async def _unload_lora(self, handle: str) -> None:
        from sglang.srt.managers.io_struct import UnloadLoRAAdapterReqInput

        result = await self._manager.unload_lora_adapter(
            UnloadLoRAAdapterReqInput(lora_name=handle), None)
        if not result.success:
            raise AdapterError(f"SGLang did not unload LoRA {handle!r}: "
                               f"{result.error_message}")
