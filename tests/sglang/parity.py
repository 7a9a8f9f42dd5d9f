"""Served by SGLang vs the transformers reference: requests, the reference's answers, and
the checks (token ids, logprobs within 1e-4, the every-token probe)."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field

import torch

TOL = 1e-4
MAX_NEW = 6


@dataclass
class Request:
    name: str
    prompt: list[int]
    talan: bool = True
    lora: str | None = None  # SGLang's adapter name, or None for the base model
    adapter: int | None = None  # the TALAN adapter on a server of many (None: its one)
    input_logprobs: bool = False
    want: dict = field(default_factory=dict)  # the reference: ids, logprobs, prompt logprobs

    def job(self) -> dict:
        return {"name": self.name, "input_ids": self.prompt, "talan": self.talan,
                "adapter": self.adapter, "lora": self.lora, "max_new": MAX_NEW,
                "input_logprobs": self.input_logprobs}


def prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Ids from 3 on: 0-2 are the tiny tokenizers' special tokens.
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def answer(reference, request: Request, adapter: bool = True) -> dict:
    """Greedy ids and logprobs by full-sequence forwards; prompt logprobs too."""
    from talan_serve.reference import talan_disabled

    adapter_off = not adapter and hasattr(reference, "disable_adapter")
    contexts = [reference.disable_adapter() if adapter_off else contextlib.nullcontext(),
                contextlib.nullcontext() if request.talan else talan_disabled(reference)]
    ids, logprobs = [], []
    with torch.no_grad(), contexts[0], contexts[1]:
        for step in range(MAX_NEW):
            out = reference(input_ids=torch.tensor([request.prompt + ids])).logits[0]
            out = out.float().log_softmax(-1)
            if step == 0:
                positions = torch.arange(len(request.prompt) - 1)
                prompt = out[positions, torch.tensor(request.prompt[1:])].tolist() \
                    if len(request.prompt) > 1 else []
            token = int(out[-1].argmax())
            ids.append(token)
            logprobs.append(float(out[-1, token]))
    return {"ids": ids, "logprobs": logprobs, "prompt_logprobs": prompt}


def failures(requests: list[Request], served: dict) -> list[str]:
    """Every served request against its reference answer (empty: parity)."""
    by_name = {entry["name"]: entry for phase in served["phases"] for entry in phase}
    found = []
    for request in requests:
        got, want = by_name[request.name], request.want
        diffs = [abs(a - b) for a, b in zip(got["output_logprobs"], want["logprobs"],
                                             strict=True)]
        if got["output_ids"] != want["ids"] or max(diffs) > TOL:
            found.append(f"{request.name}: ids {got['output_ids']} want {want['ids']}, "
                         f"logprob diff {max(diffs):.2e}")
        if request.input_logprobs:
            prompt = got["input_logprobs"][1:]
            diffs = [abs(a - b) for a, b in zip(prompt, want["prompt_logprobs"], strict=True)]
            if diffs and max(diffs) > TOL:
                found.append(f"{request.name}: prompt logprob diff {max(diffs):.2e}")
    return found


def probe_violations(records: list[dict]) -> tuple[list, dict]:
    """Every TALAN-on request's running mass equals the tokens it absorbed after each
    step (its cached prefix, each chunk, +1 per decode step); TALAN-off stays 0."""
    steps: dict[str, list] = {}
    entries: dict[int, set] = {}
    for record in records:
        for row, rid in enumerate(record["rids"]):
            decode = record["mode"] == "DECODE"
            steps.setdefault(rid, []).append((
                1 if decode else record["extend_seq_lens"][row],
                None if decode else record["extend_prefix_lens"][row],
                record["mass_before"][row], record["mass_after"][row],
                record["enabled"][row]))
            entries.setdefault(record["entries"][row], set()).add(rid)
    bad = []
    for rid, history in steps.items():
        on, absorbed = history[0][4], None
        for new, prefix, before, after, enabled in history:
            if enabled != on:
                bad.append((rid, "the switch changed mid-request"))
            elif not on:
                if abs(before) > 1e-6 or abs(after) > 1e-6:
                    bad.append((rid, "a TALAN-off request has a state", before, after))
            else:
                if absorbed is None:
                    absorbed = prefix or 0  # a radix hit or a resumed chunk: its prefix
                if abs(before - absorbed) > 1e-3 or abs(after - absorbed - new) > 1e-3:
                    bad.append((rid, "mass", before, after, "absorbed", absorbed, "+", new))
                absorbed += new
    stats = {"requests": len(steps), "steps": sum(len(h) for h in steps.values()),
             "entries": len(entries),
             "reused_entries": sum(len(r) > 1 for r in entries.values())}
    return bad, stats
