"""vLLM (V1 ``AsyncLLM``) behind the ``Backend`` protocol.

The front end hands over token ids; vLLM schedules, batches, detokenizes (stop strings
need text) and computes logprobs. This is the front end's one vLLM module, and it uses
vLLM's public engine API only; the TALAN plugin inside vLLM is ``talan_serve.plugins.vllm``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from server.adapters import (
    AdapterHost,
    ServesAdapters,
    plan_adapter_host,
)
from server.backends.base import (
    BackendConfig,
    EngineDeadError,
    EngineInputError,
    GenerateOutput,
    GenerateRequest,
    ModelInfo,
    PositionLogprobs,
    SamplingOptions,
    SequenceDelta,
    TokenLogprob,
    adapter_mode,
    held_back_text,
)
from talan_serve.plugins.vllm import lora_request, max_lora_rank
from talan_serve.prepared import PreparedModel
from talan_serve.switch import switch_args

logger = logging.getLogger(__name__)


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


def _on_cuda() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cuda_alike()


def engine_args(
    config: BackendConfig,
    prepared: PreparedModel | None,
    model_path: Path | None = None,
    loras: tuple[int, int] | None = None,
) -> Any:
    """vLLM's engine arguments. ``model_path``: a folder other than the prepared one (a
    base for many adapters); ``loras``: (LoRAs at once, largest rank) for per-request LoRA."""
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    if model_path is None:
        model_path = prepared.path if prepared is not None else Path(config.model_dir)
    if prepared is not None and prepared.lora_dir is not None:
        loras = (1, max_lora_rank(prepared))
    kwargs: dict[str, Any] = dict(
        model=str(model_path),
        served_model_name=config.served_name,
        dtype=config.dtype,
        seed=config.seed,
        enforce_eager=config.enforce_eager,
        # TALAN runs replicated on every tensor-parallel rank, and on the pipeline stage
        # that holds its connection point (talan_serve/plugins/vllm/model.py).
        tensor_parallel_size=config.tensor_parallel_size,
        pipeline_parallel_size=config.pipeline_parallel_size,
        data_parallel_size=config.data_parallel_size,
        distributed_executor_backend=config.distributed_executor_backend,
        # Structured outputs through xgrammar (which runs on CPU too), with compact JSON: no
        # whitespace between tokens, so that a model cannot spend its max_tokens on
        # indentation and stop mid-document.
        structured_outputs_config=StructuredOutputsConfig(backend="xgrammar",
                                                          disable_any_whitespace=True),
    )
    if loras is not None:
        kwargs["enable_lora"] = True
        kwargs["max_loras"], kwargs["max_lora_rank"] = loras
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
    if config.deterministic and not _on_cuda():
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


class VllmBackend(ServesAdapters):
    """``Backend`` over vLLM's AsyncLLM (engine core in its own process, as in vLLM's server)."""

    def __init__(self, config: BackendConfig) -> None:
        if config.deterministic and _on_cuda():
            # vLLM's batch-invariant kernels (read at engine start).
            os.environ["VLLM_BATCH_INVARIANT"] = "1"
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        self.config = config
        if config.many_adapters:
            self._prepared = None
            self.checkpoint_lora = None
            model_path, loras = self._prepare_adapter_host(config)
            args = engine_args(config, None, model_path, loras)
        else:
            self._prepared = config.prepare()
            self.checkpoint_lora = lora_request(self._prepared) if self._prepared else None
            args = engine_args(config, self._prepared)
        self._llm = AsyncLLM.from_engine_args(args)
        model_config = self._llm.model_config
        tokenizer = AutoTokenizer.from_pretrained(Path(config.model_dir))
        self.info = ModelInfo(
            name=config.served_name,
            max_model_len=model_config.max_model_len,
            tokenizer=tokenizer,
            vocab_size=model_config.get_vocab_size(),
            talan=self._prepared is not None and self._prepared.has_talan,
            dtype=str(model_config.dtype).removeprefix("torch."),
            adapter=adapter_mode(self._prepared),
            engine="vllm",
            engine_version=_vllm_version(),
        )

    def _prepare_adapter_host(self, config: BackendConfig) -> tuple[Path, tuple[int, int] | None]:
        """The base folder sized for the adapters given at start (and the ones asked for)."""
        from talan_serve.base_models import cache_root
        from talan_serve.plugins.vllm._compat import lora_rank_slot
        from talan_serve.prepared import prepare_adapter_host

        # Full decode graphs (CUDA, not eager) hold the adapter kinds built at start.
        plan = plan_adapter_host(config, lora_rank_slot,
                                 kinds_fixed=_on_cuda() and not config.enforce_eager)
        self.adapter_host = AdapterHost(plan.registry, _VllmAdapters(self), config.served_name)
        folder = prepare_adapter_host(config.model_dir, cache_root() / "prepared", plan.spec)
        return folder, None if plan.lora_rank is None else (config.max_adapters, plan.lora_rank)


    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError as VllmDeadError

        route = self.route(request.model, request.sampling.talan_enabled)
        try:
            params = sampling_params(request.sampling, request.stream, route.talan_args)
        except (VLLMValidationError, ValueError) as error:
            raise EngineInputError(str(error)) from error
        prompt: dict[str, Any] = {"prompt_token_ids": request.prompt_token_ids}
        if request.cache_salt is not None:
            prompt["cache_salt"] = request.cache_salt
        first = True
        history: dict[int, tuple[list[int], list[str]]] = {}
        try:
            with self.in_flight(route):
                async for out in self._llm.generate(prompt, params, request.request_id,
                                                    lora_request=route.lora):
                    yield self._output(request, out, params, history, first)
                    first = False
        except VllmDeadError as error:
            raise EngineDeadError(str(error)) from error
        except (VLLMValidationError, ValueError) as error:
            raise EngineInputError(str(error)) from error

    def _output(self, request: GenerateRequest, out: Any, params: Any,
                history: dict[int, tuple[list[int], list[str]]], first: bool) -> GenerateOutput:
        sequences = []
        for seq in out.outputs:
            delta = SequenceDelta(
                index=seq.index,
                token_ids=list(seq.token_ids),
                text=seq.text,
                logprobs=_logprobs(seq.logprobs) if seq.logprobs is not None else None,
                finish_reason=seq.finish_reason,
            )
            ids, texts = history.setdefault(seq.index, ([], []))
            ids.extend(delta.token_ids)
            texts.append(delta.text)
            if delta.finish_reason == "length":
                delta.text += held_back_text(self.info.tokenizer, ids, "".join(texts), params)
            sequences.append(delta)
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


class _VllmAdapters:
    """``AdapterEngine`` for vLLM: TALAN blocks through the workers' extension
    (``talan_serve.plugins.vllm.worker``), LoRAs as vLLM ``LoRARequest``s."""

    def __init__(self, backend: VllmBackend):
        self._backend = backend

    async def load_talan(self, adapter_id: int, checkpoint_dir: str) -> None:
        await self._backend._llm.collective_rpc("talan_load_adapter",
                                                args=(adapter_id, checkpoint_dir))

    async def unload_talan(self, adapter_id: int) -> None:
        await self._backend._llm.collective_rpc("talan_unload_adapter", args=(adapter_id,))

    async def load_lora(self, name: str, adapter_id: int, lora_dir: Path) -> Any:
        from talan_serve.plugins.vllm._compat import LoRARequest

        lora = LoRARequest(name, adapter_id, str(lora_dir))
        await self._backend._llm.add_lora(lora)
        return lora

    async def unload_lora(self, adapter_id: int, handle: Any) -> None:
        await self._backend._llm.remove_lora(adapter_id)
