"""OpenAI sampling fields to the engine-neutral ``SamplingOptions``."""

from __future__ import annotations

from server.backends.base import SamplingOptions
from server.errors import bad_request
from server.schemas import _SamplingFields
from talan_serve.switch import parse_switch


def sampling_options(
    request: _SamplingFields,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
) -> SamplingOptions:
    temperature = 1.0 if request.temperature is None else request.temperature
    if request.n > 1 and temperature == 0.0:
        # Greedy decoding would return n identical choices; engines refuse it too.
        raise bad_request("n > 1 needs temperature > 0 (greedy choices would be identical)",
                          param="n")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=max(request.top_k or 0, 0),
        seed=request.seed,
        stop=[s for s in stop if s],
        stop_token_ids=list(request.stop_token_ids or []),
        n=request.n,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        ignore_eos=request.ignore_eos,
        talan_enabled=parse_switch(request.talan),
    )
