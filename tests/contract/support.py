"""What the contract tests compare with: the transformers reference, token by token."""

from __future__ import annotations

import contextlib

import torch

TOL = 1e-4  # logprobs, fp32: the engines' parity tolerance


def greedy(model, ids: list[int], steps: int, talan: bool) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs by full-sequence forwards (the spec's reference)."""
    from talan_serve.reference import talan_disabled

    out_ids, out_lps = [], []
    context = contextlib.nullcontext() if talan else talan_disabled(model)
    with torch.no_grad(), context:
        for _ in range(steps):
            logprobs = model(input_ids=torch.tensor([ids + out_ids])).logits[0, -1]
            logprobs = logprobs.float().log_softmax(-1)
            token = int(logprobs.argmax())
            out_ids.append(token)
            out_lps.append(float(logprobs[token]))
    return out_ids, out_lps
