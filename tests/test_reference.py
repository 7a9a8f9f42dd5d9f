"""TALAN in transformers hosts: cached / chunked / generated = full-sequence forward."""

import itertools
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from talan_serve.config import CLUSTERING_METHODS, INTEGRATION_TYPES, NETWORK_TYPES
from talan_serve.reference import (
    attach_talan,
    detach_talan,
    find_talan,
    record_perturbation,
    talan_disabled,
)
from talan_serve.testing import randomize_gate, tiny_talan_config

COMBOS = list(itertools.product(NETWORK_TYPES, INTEGRATION_TYPES, CLUSTERING_METHODS))
POINTS = ["embedding", "layer_0", "layer_3"]  # the tiny hosts have 4 layers: 3 is the last
LOGIT_TOL = 1e-5


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def host(request, tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model(request.param), dtype=torch.float32)
    return model.eval()


@pytest.fixture
def with_talan(host):
    """Attach a TALAN block for one test, detach afterwards (the host is shared)."""
    blocks = []

    def attach(**overrides):
        torch.manual_seed(len(blocks))
        block = attach_talan(host, tiny_talan_config(host.config.hidden_size, **overrides))
        randomize_gate(block)
        blocks.append(block)
        return block

    yield attach
    detach_talan(host)


def prompt_ids(length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (1, length), generator=generator)


def chunked_logits(model, ids, chunk_sizes):
    """Feed ``ids`` through the KV cache in chunks; return the concatenated logits."""
    cache = DynamicCache(config=model.config)
    outputs, start = [], 0
    for size in chunk_sizes:
        chunk = ids[:, start:start + size]
        mask = torch.ones(ids.shape[0], start + chunk.shape[1], dtype=torch.long)
        out = model(input_ids=chunk, attention_mask=mask, past_key_values=cache, use_cache=True)
        outputs.append(out.logits)
        start += size
    return torch.cat(outputs, dim=1)


def random_chunks(total: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    sizes = []
    while total > 0:
        sizes.append(min(total, rng.randint(1, 7)))
        total -= sizes[-1]
    return sizes


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("network_type, integration_type, clustering_method", COMBOS)
@torch.no_grad()
def test_full_equals_incremental_equals_chunked_equals_generate(
    host, with_talan, point, network_type, integration_type, clustering_method
):
    with_talan(connection_point=point, network_type=network_type,
               integration_type=integration_type, clustering_method=clustering_method)
    ids = prompt_ids(17)
    full = host(ids).logits
    with talan_disabled(host):
        plain = host(ids).logits
    assert (full - plain).abs().amax() > 1e-3, "TALAN should change the logits here"

    incremental = chunked_logits(host, ids, [1] * ids.shape[1])
    torch.testing.assert_close(incremental, full, rtol=0, atol=LOGIT_TOL)
    chunked = chunked_logits(host, ids, random_chunks(ids.shape[1], seed=hash(point) % 100))
    torch.testing.assert_close(chunked, full, rtol=0, atol=LOGIT_TOL)

    generated = host.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                              do_sample=False, min_new_tokens=8)
    recomputed = host(generated).logits[:, ids.shape[1] - 1:-1].argmax(-1)
    assert torch.equal(generated[:, ids.shape[1]:], recomputed)


@torch.no_grad()
def test_isolation_left_padded_batch_and_permutation(host, with_talan):
    with_talan(connection_point="layer_1", network_type="gated_cross_attn")
    lengths = [9, 3, 14, 6]
    prompts = [prompt_ids(n, seed=i)[0] for i, n in enumerate(lengths)]
    alone = [host(p[None]).logits[0] for p in prompts]

    def batched(order):
        width = max(lengths)
        ids = torch.zeros(len(order), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(order):
            ids[row, width - lengths[i]:] = prompts[i]
            mask[row, width - lengths[i]:] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return host(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits

    for order in ([0, 1, 2, 3], [2, 0, 3, 1]):
        logits = batched(order)
        for row, i in enumerate(order):
            torch.testing.assert_close(logits[row, -lengths[i]:], alone[i], rtol=0, atol=1e-4)


@torch.no_grad()
def test_batched_generate_with_left_padding_equals_solo(host, with_talan, tiny_model):
    with_talan(connection_point="embedding", network_type="per_token_mix")
    prompts = [prompt_ids(n, seed=10 + n)[0] for n in (4, 11)]
    width = 11
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    batch = host.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                          do_sample=False, pad_token_id=0)
    for row, p in enumerate(prompts):
        solo = host.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert torch.equal(batch[row, width:], solo[0, len(p):])


@torch.no_grad()
def test_causality_changing_token_j_changes_nothing_before_j(host, with_talan):
    with_talan(connection_point="layer_0", network_type="multihead_local")
    ids = prompt_ids(12)
    base = host(ids).logits
    changed = ids.clone()
    changed[0, 7] = (changed[0, 7] + 1) % 500
    out = host(changed).logits
    torch.testing.assert_close(out[:, :7], base[:, :7], rtol=0, atol=0)
    assert (out[:, 7:] - base[:, 7:]).abs().amax() > 1e-4


@torch.no_grad()
def test_off_switch_equals_the_plain_host_exactly(host, with_talan):
    ids = prompt_ids(10)
    plain = host(ids).logits
    with_talan(connection_point="layer_2")
    assert find_talan(host) is not None
    with talan_disabled(host):
        torch.testing.assert_close(host(ids).logits, plain, rtol=0, atol=0)
    assert (host(ids).logits - plain).abs().amax() > 1e-3


def test_attach_refuses_a_host_it_does_not_fit(host):
    with pytest.raises(ValueError, match="hidden_size 64 does not fit"):
        attach_talan(host, tiny_talan_config(64))
    with pytest.raises(ValueError, match="has 4 decoder layers"):
        attach_talan(host, tiny_talan_config(host.config.hidden_size, connection_point="layer_4"))


@torch.no_grad()
def test_resuming_a_cache_filled_without_talan_is_refused(host, with_talan):
    with_talan()
    cache = DynamicCache(config=host.config)
    ids = prompt_ids(5)
    with talan_disabled(host):
        host(input_ids=ids, past_key_values=cache, use_cache=True)
    with pytest.raises(RuntimeError, match="no TALAN state"):
        host(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)


@torch.no_grad()
def test_p1_perturbation_ratio_is_reported_and_scales_with_alpha(host, with_talan):
    block = with_talan(connection_point="layer_1", integration_type="direct", alpha=0.01)
    ids = prompt_ids(9)
    with record_perturbation(host) as ratios:
        host(ids)
        host(ids)
    assert len(ratios) == 2 and ratios[0] == ratios[1] and 0 < ratios[0] < 0.1
    with torch.no_grad():
        block.writeback.alpha.mul_(3.0)
    with record_perturbation(host) as tripled:
        host(ids)
    assert abs(tripled[0] / ratios[0] - 3.0) < 1e-4


def test_load_reference_takes_every_name_the_server_takes():
    """``smollm2-talan-demo`` is the default model's base + the demo checkpoint."""
    from talan_serve.base_models import default_model_dir
    from talan_serve.reference import load_reference
    from talan_serve.registry import REPO_CHECKPOINTS

    by_name, tokenizer = load_reference("smollm2-talan-demo")
    by_paths, _ = load_reference(default_model_dir(),
                                 talan=REPO_CHECKPOINTS / "smollm2-talan-demo")
    by_checkpoint_dir, _ = load_reference(REPO_CHECKPOINTS / "smollm2-talan-demo")
    ids = tokenizer("What is 12*7?", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = by_paths(ids).logits
        for model in (by_name, by_checkpoint_dir):
            assert find_talan(model) is not None and hasattr(model, "peft_config")
            assert torch.equal(model(ids).logits, expected)
