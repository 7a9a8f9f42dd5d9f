"""Many TALAN(+LoRA) adapters on one base model inside real SGLang (CPU, fp32, greedy).

Three adapters that differ in mixer, T and connection point, two more stacked with the
first, the base model and TALAN-off requests in one batch, prefilled in 32-token chunks:
every request gets its own adapter's reference token ids, and logprobs within 1e-4. A
radix-cache hit is shared only within an adapter; an adapter loaded at run time serves
as the reference says, and unloading one leaves the others as they were.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.sglang.conftest import run_engine
from tests.sglang.parity import Request, answer, failures, prompts

pytestmark = pytest.mark.slow
VOCAB = 500

ADAPTERS = {
    # id: (checkpoint options, LoRA); T 2/4/3, three mixers, three connection points.
    1: (dict(network_type="cross_attn", n_themes=2, connection_point="layer_1",
             integration_type="direct"), True),
    2: (dict(network_type="per_token_mix", n_themes=4, connection_point="embedding",
             clustering_method="soft_mos"), True),
    3: (dict(network_type="gated_cross_attn", n_themes=3, connection_point="layer_2"), False),
    # Adapter 1's kind with other T: decoding rows of 1, 4 and 5 run as one stacked call.
    4: (dict(network_type="cross_attn", n_themes=3, connection_point="layer_1",
             integration_type="direct", alpha=0.9), False),
    5: (dict(network_type="cross_attn", n_themes=4, connection_point="layer_1",
             integration_type="direct", alpha=0.2), False),
    # Loaded at run time: a fourth kind, at a point the server already runs.
    6: (dict(network_type="multihead_local", n_themes=2, connection_point="layer_1"), True),
}
AT_START = (1, 2, 3, 4, 5)


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from talan_serve.adapter_spec import AdapterSetSpec
    from talan_serve.checkpoint import load_checkpoint
    from talan_serve.prepared import prepare_adapter_base
    from talan_serve.reference import load_reference
    from talan_serve.testing import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("sglang-adapters")
    model = tiny_model("qwen3")
    checkpoints = {
        adapter: load_checkpoint(build_tiny_checkpoint(model, root / f"ckpt-{adapter}",
                                                       lora=lora, seed=adapter, **options))
        for adapter, (options, lora) in ADAPTERS.items()
    }
    references = {adapter: load_reference(model, talan=c.path)[0]
                  for adapter, c in checkpoints.items()}
    references[None] = AutoModelForCausalLM.from_pretrained(model).float().eval()
    hidden = json.loads((Path(model) / "config.json").read_text())["hidden_size"]
    spec = AdapterSetSpec.covering([checkpoints[a].config for a in AT_START], hidden,
                                   max_adapters=8)
    folder = prepare_adapter_base(model, root / "prepared", spec)

    def entry(adapter: int) -> dict:
        checkpoint = checkpoints[adapter]
        lora = checkpoint.adapter_dir
        return {"id": adapter, "path": str(checkpoint.path),
                "lora": f"a{adapter}" if lora else None, "lora_dir": str(lora) if lora else None}

    shared = prompts([125], VOCAB, 3)[0]
    tails = prompts([30, 40, 35], VOCAB, 4)
    mixed = [request(f"mix{i}", p, adapter, talan) for i, (p, (adapter, talan)) in enumerate(
        zip(prompts([5, 7, 4, 150, 33, 90, 2, 70, 12, 40, 9, 21], VOCAB, 11),
            [(1, True), (4, True), (5, True), (2, True), (3, True), (None, False),
             (1, False), (2, True), (3, False), (4, True), (3, True), (4, False)],
            strict=True))]
    late = prompts([40, 9], VOCAB, 12)
    phases = [
        {"load": [entry(a) for a in AT_START], "requests": mixed},
        [request("shared", shared, 1, True)],  # alone: its chunk-end states are cached
        [request("hit_same", shared[:100] + tails[0], 1, True),  # hits at a chunk end
         request("hit_other", shared[:100] + tails[1], 4, True),  # another adapter's
         request("hit_base", shared[:100] + tails[2], None, False)],
        {"load": [entry(6)],
         "requests": [request("late6", late[0], 6, True), request("late6_off", late[1], 6,
                                                                  False),
                      request("late1", late[1], 1, True), request("late5", late[0], 5, True)]},
        {"unload": [entry(1)],
         "requests": [request("after4", late[0], 4, True), request("after6", late[1], 6, True),
                      request("after2", late[0], 2, True)]},
    ]
    requests = [r for phase in phases
                for r in (phase["requests"] if isinstance(phase, dict) else phase)]
    for r in requests:
        r.want = answer(references[r.adapter], r)
    jobs = [{**phase, "requests": [r.job() for r in phase["requests"]]}
            if isinstance(phase, dict) else [r.job() for r in phase] for phase in phases]
    engine = dict(enable_lora=True, max_lora_rank=4, lora_target_modules=["all"],
                  lora_backend="torch_native", max_loras_per_batch=9, chunked_prefill_size=32,
                  max_mamba_cache_size=64)
    result = run_engine(folder, jobs, root, engine, probe=False, TALAN_TEST_NO_PIN="1")
    return requests, result


def request(name: str, prompt: list[int], adapter: int | None, talan: bool) -> Request:
    with_lora = adapter is not None and ADAPTERS[adapter][1]
    return Request(name, prompt, talan=talan, adapter=adapter,
                   lora=f"a{adapter}" if with_lora else None)


def test_every_request_gets_its_own_adapter(served):
    requests, result = served
    assert not failures(requests, result)


def test_prefix_cache_is_shared_within_an_adapter_only(served):
    _, result = served
    cached = {e["name"]: e["cached_tokens"] for phase in result["phases"] for e in phase}
    assert cached["hit_same"] >= 96  # adapter 1's chunk-end state, copied from the cache
    assert cached["hit_other"] == 0 and cached["hit_base"] == 0


def test_loaded_late_and_unloaded(served):
    """Adapter 6 (a kind not loaded at start) serves its reference; after adapter 1 is
    unloaded, the others still serve theirs (checked with the rest above)."""
    requests, result = served
    names = {e["name"] for phase in result["phases"] for e in phase}
    assert {"late6", "late6_off", "after4", "after6", "after2"} <= names
    assert not failures([r for r in requests if r.name.startswith(("late", "after"))], result)
