"""TALAN inside real SGLang (CPU, fp32, greedy) against the transformers reference.

Every served token id equals the reference's greedy choice and every served logprob is
within 1e-4 of the reference full-sequence forward (docs/design.md, "Properties"), under
batching, chunked prefill, pool entries reused by later requests, radix-cache hits, and
TALAN-on and -off requests in one batch; a probe reads each request's running mass after
every step (TALAN acted on every token). A negative control shows the checks see a
dropped state.
"""

from __future__ import annotations

import pytest

from tests.sglang.conftest import run_engine
from tests.sglang.parity import Request, answer, failures, probe_violations, prompts

pytestmark = pytest.mark.slow
VOCAB = 500


def prepare(tiny_model, workdir, arch="qwen3", merge=True, **talan):
    from talan_serve.prepared import prepare_model_dir
    from talan_serve.reference import load_reference
    from talan_serve.testing import build_tiny_checkpoint

    host = tiny_model(arch)
    name = "-".join(f"{k}={v}" for k, v in sorted(talan.items())) or "default"
    checkpoint = build_tiny_checkpoint(host, workdir / f"ck-{arch}-{name}", **talan)
    prepared = prepare_model_dir(checkpoint, workdir / f"served-{arch}-{name}-{merge}",
                                 base_model_dir=host, merge_lora=merge)
    return prepared, load_reference(host, talan=checkpoint)[0]


def main_phases() -> tuple[list[list[Request]], dict[str, Request]]:
    batch = [Request(f"batch{n}", p, input_logprobs=True)
             for n, p in zip([1, 3, 9, 17, 40, 77, 150, 300],
                             prompts([1, 3, 9, 17, 40, 77, 150, 300], VOCAB, 1), strict=True)]
    mixed = [Request(f"mix{i}", p, talan=i % 2 == 0)
             for i, p in enumerate(prompts([20, 33, 41, 55, 60, 25], VOCAB, 2))]
    shared = prompts([125], VOCAB, 3)[0]
    tails = prompts([30, 40], VOCAB, 4)
    phases = [
        batch,  # prompts of 1..300 tokens in one batch, chunked at 32
        mixed,  # later requests take freed pool entries; TALAN on and off in one batch
        [Request("shared_a", shared)],  # alone: its chunk-end states go to the radix cache
        [Request("shared_b", shared[:100] + tails[0]),  # hits at a chunk-end state
         Request("shared_c", shared[:100] + tails[1])],
        [Request("shared_a_off", shared, talan=False)],  # must not take the on entries
    ]
    return phases, {r.name: r for phase in phases for r in phase}


def serve_and_check(prepared, reference, phases, workdir, engine, adapter=True, **env):
    requests = [r for phase in phases for r in phase]
    for request in requests:
        request.want = answer(reference, request, adapter=adapter or request.lora is not None)
    served = run_engine(prepared.path, [[r.job() for r in phase] for phase in phases],
                        workdir, engine, **env)
    return requests, served


def test_batching_chunks_entries_radix_and_switch(tiny_model, tmp_path):
    prepared, reference = prepare(tiny_model, tmp_path)
    phases, named = main_phases()
    # A follow-up turn: a served prompt + its answer + more, hitting the finished state
    # (served alone, right after it: the small state pool evicts older entries).
    first = Request("turn1", prompts([77], VOCAB, 9)[0])
    follow = Request("turn2", first.prompt)
    follow.want = answer(reference, follow)
    follow.prompt = first.prompt + follow.want["ids"][:-1] + prompts([12], VOCAB, 5)[0]
    turn = first.prompt
    phases += [[first], [follow]]
    engine = dict(chunked_prefill_size=32, max_mamba_cache_size=8)
    requests, served = serve_and_check(prepared, reference, phases, tmp_path, engine)
    assert served["hooks_applied"] == {"sampling_verify": True, "req_init": True,
                                       "forward_batch_init_new": True}
    assert not failures(requests, served)
    cached = {e["name"]: e["cached_tokens"] for phase in served["phases"] for e in phase}
    assert cached["shared_b"] >= 96 and cached["shared_c"] >= 96  # radix hits, state copied
    assert cached["turn2"] > len(turn)  # the finished request's state
    assert cached["shared_a_off"] == 0  # TALAN-off requests have a cache of their own
    bad, stats = probe_violations(served["probe"])
    assert not bad, bad[:5]
    assert stats["reused_entries"] > 0  # 8 pool entries for 17 requests: entries reused


def test_negative_control_sees_a_dropped_state(tiny_model, tmp_path):
    """With every extend step starting from an empty state, exactly the chunked and
    radix-hit requests fail: the checks above see state bugs."""
    prepared, reference = prepare(tiny_model, tmp_path)
    phases, _ = main_phases()
    phases = [phases[0], phases[2], phases[3]]
    requests, served = serve_and_check(prepared, reference, phases, tmp_path,
                                       dict(chunked_prefill_size=32),
                                       TALAN_TEST_FAULT="drop_extend_state")
    failed = {line.split(":")[0] for line in failures(requests, served)}
    assert failed >= {"batch40", "batch77", "batch150", "batch300", "shared_b", "shared_c"}
    assert not failed & {"batch1", "batch3", "batch9", "batch17"}  # a single chunk each
    assert probe_violations(served["probe"])[0]


# The default config (multihead_local, learned gate, layer_1) is the main test's.
@pytest.mark.parametrize("talan", [
    dict(network_type="gated_cross_attn", gate_type="scalar", clustering_method="soft_mos"),
    dict(network_type="per_token_mix", integration_type="direct", connection_point="layer_3"),
], ids=["gated_cross_attn-soft_mos", "per_token_mix-last_layer"])
def test_every_mixer_and_writeback(tiny_model, tmp_path, talan):
    prepared, reference = prepare(tiny_model, tmp_path, **talan)
    lengths = [1, 9, 40, 150]
    batch = [Request(f"p{n}", p, input_logprobs=True)
             for n, p in zip(lengths, prompts(lengths, VOCAB, 6), strict=True)]
    batch.append(Request("off", prompts([50], VOCAB, 7)[0], talan=False))
    requests, served = serve_and_check(prepared, reference, [batch], tmp_path,
                                       dict(chunked_prefill_size=32))
    assert not failures(requests, served)
    assert not probe_violations(served["probe"])[0]


def test_lora_served_per_request(tiny_model, tmp_path):
    """SGLang's own LoRA (torch_native on CPU): adapter and base requests in one batch; the
    fourth mixer (cross_attn, direct writeback, at the embedding) rides along."""
    prepared, reference = prepare(tiny_model, tmp_path, merge=False, network_type="cross_attn",
                                  integration_type="direct", connection_point="embedding")
    assert prepared.lora_dir is not None
    base = prompts([17, 60, 130], VOCAB, 8)
    batch = [Request("lora_on", base[0], lora="talan"), Request("lora_long", base[2],
                                                                lora="talan"),
             Request("lora_off", base[1], talan=False, lora="talan"),
             Request("no_lora", base[1], lora=None)]
    engine = dict(enable_lora=True, lora_paths=[f"talan={prepared.lora_dir}"],
                  lora_backend="torch_native", max_loras_per_batch=2, chunked_prefill_size=32)
    requests, served = serve_and_check(prepared, reference, [batch], tmp_path, engine,
                                       adapter=False, TALAN_TEST_NO_PIN="1")
    assert not failures(requests, served)


def test_demo_checkpoint_on_smollm2(tmp_path):
    from talan_serve.base_models import default_model_dir
    from talan_serve.prepared import prepare_model_dir
    from talan_serve.reference import load_reference
    from talan_serve.registry import REPO_CHECKPOINTS

    checkpoint = REPO_CHECKPOINTS / "smollm2-talan-demo"
    prepared = prepare_model_dir(checkpoint, tmp_path / "demo", merge_lora=True)
    reference, tokenizer = load_reference(default_model_dir(), talan=checkpoint)
    texts = ["What is 12*7?", "Tom has 3 apples and buys 5 more. How many apples now?",
             "Name a color."]
    def chat(text: str) -> list[int]:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 tokenize=False, add_generation_prompt=True)
        return tokenizer(rendered, add_special_tokens=False).input_ids

    batch = [Request(f"q{i}", chat(text)) for i, text in enumerate(texts)]
    batch.append(Request("off", batch[0].prompt, talan=False))
    batch[1].input_logprobs = True
    requests, served = serve_and_check(prepared, reference, [batch], tmp_path,
                                       dict(chunked_prefill_size=64))
    assert not failures(requests, served)
