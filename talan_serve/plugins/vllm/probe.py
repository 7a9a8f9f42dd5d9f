"""Read TALAN's per-request state out of a running vLLM engine (tests and GPU checks).

Every token's soft assignment sums to 1 over the T slots, so a request's running mass
``sum_t D[t]`` equals the number of tokens its state has absorbed. Reading it after each
engine step shows whether the side path acted on every token, including decode steps
replayed from CUDA graphs (docs/design.md, "Properties": every token).

Use with ``LLM.collective_rpc(running_state_masses)`` (module-level functions pickle by
reference, so this also works with the multi-process engine).
"""

from __future__ import annotations

from typing import Any


def _runner(worker: Any) -> Any:
    return getattr(worker, "worker", worker).model_runner


def _talan_layer(runner: Any) -> Any:
    from talan_serve.plugins.vllm.layer import VllmStateLayer

    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    for module in model.modules():
        if isinstance(module, VllmStateLayer):
            return module
    raise LookupError("talan-serve: this engine's model has no TALAN state layer")


def _state_group(runner: Any) -> int:
    from talan_serve.plugins.vllm._compat import MambaSpec

    for index, group in enumerate(runner.kv_cache_config.kv_cache_groups):
        if isinstance(group.kv_cache_spec, MambaSpec):
            return index
    raise LookupError("talan-serve: no state-cache group in this engine")


def running_state_masses(worker: Any) -> dict[str, float]:
    """``{request id: sum_t D[t]}`` for the requests in the worker's current batch.

    Valid with ``enable_prefix_caching=False`` (one state index per request).
    """
    runner = _runner(worker)
    if runner.cache_config.mamba_cache_mode != "none":
        raise ValueError("running_state_masses needs enable_prefix_caching=False")
    states = _talan_layer(runner).kv_cache[0]
    table = runner.input_batch.block_table[_state_group(runner)].block_table.np
    masses = {}
    for row, request_id in enumerate(runner.input_batch.req_ids):
        index = int(table[row, 0])
        masses[request_id] = float(states[index, :, -1].double().sum().item())
    return masses


def stepwise_state_masses(
    llm: Any,
    prompts: list[list[int]],
    talan: list[bool],
    max_tokens: int,
    lora_request: Any = None,
) -> dict[str, list[float]]:
    """Run requests step by step; each request's state mass after every engine step.

    ``llm`` is a ``vllm.LLM`` with an in-process engine; ``talan`` switches TALAN per
    request. Keys are the engine's request ids, in the order added.
    """
    from talan_serve.plugins.vllm._compat import SamplingParams
    from talan_serve.switch import switch_args

    engine = llm.llm_engine
    for index, (prompt, on) in enumerate(zip(prompts, talan, strict=True)):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                extra_args=switch_args(on))
        engine.add_request(f"probe-{index}", {"prompt_token_ids": prompt}, params,
                           lora_request=lora_request)
    history: dict[str, list[float]] = {}
    while engine.has_unfinished_requests():
        engine.step()
        for request_id, mass in llm.collective_rpc(running_state_masses)[0].items():
            history.setdefault(request_id, []).append(mass)
    return history
