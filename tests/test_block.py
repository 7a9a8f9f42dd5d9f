"""The block alone: golden values, one math for packed / padded / incremental calls."""

import itertools
import json
from pathlib import Path

import pytest
import torch

from talan_serve.block import TalanBlock, empty_state, running_summary
from talan_serve.config import (
    CLUSTERING_METHODS,
    INTEGRATION_TYPES,
    NETWORK_TYPES,
    TalanConfig,
)
from talan_serve.testing import randomize_gate
from talan_serve.trainable import apply_scope, parameter_groups

VECTORS = Path(__file__).resolve().parent / "data" / "golden" / "summary_attention.json"
COMBOS = list(itertools.product(NETWORK_TYPES, INTEGRATION_TYPES, CLUSTERING_METHODS))
D = 16


def make_block(network_type="multihead_local", integration_type="learned_gate",
               clustering_method="attention", seed=0, **overrides) -> TalanBlock:
    torch.manual_seed(seed)
    config = TalanConfig(
        hidden_size=D, n_themes=3, mixer_dim=8, num_heads=2, alpha=0.3,
        network_type=network_type, integration_type=integration_type,
        clustering_method=clustering_method, **overrides,
    )
    block = TalanBlock(config)
    randomize_gate(block, seed)
    return block


def test_golden_summary_vectors():
    golden = json.loads(VECTORS.read_text())
    x = torch.tensor(golden["X"], dtype=torch.float32)
    config = TalanConfig(hidden_size=golden["d"], n_themes=golden["T"], eps=golden["eps"])
    block = TalanBlock(config)
    with torch.no_grad():
        block.summarize.slot_queries.copy_(torch.tensor(golden["Q"]))
    assignments = block.summarize(x)
    torch.testing.assert_close(assignments, torch.tensor(golden["A"]), rtol=0, atol=1e-5)
    z, state = running_summary(
        x, assignments, torch.tensor([0, golden["S"]]), empty_state(config, 1), config.eps
    )
    torch.testing.assert_close(z, torch.tensor(golden["Z"]), rtol=0, atol=1e-5)
    torch.testing.assert_close(state[0, :, :-1], torch.tensor(golden["N_last"]), rtol=0, atol=1e-5)
    torch.testing.assert_close(state[0, :, -1], torch.tensor(golden["D_last"]), rtol=0, atol=1e-5)
    z_tilde = (assignments.unsqueeze(-1) * z).sum(1)
    torch.testing.assert_close(z_tilde, torch.tensor(golden["Z_tilde"]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("network_type, integration_type, clustering_method", COMBOS)
def test_packed_equals_per_sequence_equals_incremental(
    network_type, integration_type, clustering_method
):
    block = make_block(network_type, integration_type, clustering_method)
    lengths = [5, 1, 9, 3]
    seqs = [torch.randn(n, D) * 3 for n in lengths]
    cu = torch.tensor([0, *itertools.accumulate(lengths)])
    with torch.no_grad():
        packed, packed_state = block(torch.cat(seqs), cu)
        for i, seq in enumerate(seqs):
            alone, alone_state = block(seq, torch.tensor([0, len(seq)]))
            torch.testing.assert_close(packed[cu[i]:cu[i + 1]], alone, rtol=0, atol=1e-5)
            torch.testing.assert_close(packed_state[i], alone_state[0], rtol=0, atol=1e-4)
            # one token at a time, carrying the state: a decode loop
            state, steps = None, []
            for token in seq:
                out, state = block(token[None], None, state)  # decode-step entry point
                steps.append(out)
            torch.testing.assert_close(torch.cat(steps), alone, rtol=0, atol=1e-5)
            torch.testing.assert_close(state, alone_state, rtol=0, atol=1e-4)


def test_decode_step_entry_equals_packed_one_token_sequences():
    block = make_block("gated_cross_attn", clustering_method="soft_mos")
    x, state = torch.randn(5, D), torch.rand(5, 3, D + 1) * 4
    with torch.no_grad():
        step, step_state = block(x, None, state)
        packed, packed_state = block(x, torch.arange(6), state)
    torch.testing.assert_close(step, packed, rtol=0, atol=1e-6)
    torch.testing.assert_close(step_state, packed_state, rtol=0, atol=1e-6)


def test_mixed_batch_of_prefill_chunks_and_decode_steps():
    """An engine batch: decode tokens with carried states, then a continuing prefill chunk."""
    block = make_block("cross_attn")
    a, b, c = torch.randn(7, D), torch.randn(6, D), torch.randn(4, D)
    with torch.no_grad():
        full_a, _ = block(a, torch.tensor([0, 7]))
        full_b, _ = block(b, torch.tensor([0, 6]))
        full_c, _ = block(c, torch.tensor([0, 4]))
        _, state_a = block(a[:6], torch.tensor([0, 6]))
        _, state_b = block(b[:2], torch.tensor([0, 2]))
        hidden = torch.cat([a[6:], b[2:], c])  # decode a, chunk of b, fresh c
        init = torch.cat([state_a, state_b, empty_state(block.config, 1)])
        out, _ = block(hidden, torch.tensor([0, 1, 5, 9]), init)
    torch.testing.assert_close(out[0], full_a[6], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1:5], full_b[2:], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[5:], full_c, rtol=0, atol=1e-5)


def test_causal_and_padding_contributes_nothing():
    block = make_block("per_token_mix")
    x = torch.randn(2, 8, D)
    with torch.no_grad():
        base, _ = block.forward_padded(x)
        changed = x.clone()
        changed[:, 5] += 10.0
        out, _ = block.forward_padded(changed)
        torch.testing.assert_close(out[:, :5], base[:, :5], rtol=0, atol=0)
        assert (out[:, 5:] - base[:, 5:]).abs().amax() > 1e-3
        # left padding with garbage = the unpadded sequence
        padded = torch.cat([torch.randn(1, 3, D) * 100, x[:1]], dim=1)
        mask = torch.tensor([[0, 0, 0] + [1] * 8])
        out_padded, state_padded = block.forward_padded(padded, mask)
        _, state = block.forward_padded(x[:1])
    torch.testing.assert_close(out_padded[:, 3:], base[:1], rtol=0, atol=1e-5)
    torch.testing.assert_close(state_padded, state, rtol=0, atol=1e-4)


def test_state_is_fp32_and_output_keeps_dtype():
    block = make_block()
    x = torch.randn(5, D).to(torch.bfloat16)
    with torch.no_grad():
        out, state = block(x, torch.tensor([0, 5]))
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert state.shape == (1, 3, D + 1)


@pytest.mark.parametrize("network_type", NETWORK_TYPES)
def test_init_perturbation_is_alpha_times_mixer_output(network_type):
    """At init, g = v * 2 sigmoid(0) = alpha exactly, so X~ - X = alpha * H."""
    torch.manual_seed(0)
    for integration, gate_type in [("learned_gate", "vector"), ("learned_gate", "scalar"),
                                   ("direct", "vector")]:
        config = TalanConfig(hidden_size=D, n_themes=2, mixer_dim=8, num_heads=2, alpha=0.008,
                             network_type=network_type, integration_type=integration,
                             gate_type=gate_type)
        block = TalanBlock(config)
        x = torch.randn(6, D)
        with torch.no_grad():
            delta, _ = block.perturbation(x, torch.tensor([0, 6]))
            assignments = block.summarize(x)
            z, _ = running_summary(x, assignments, torch.tensor([0, 6]),
                                   empty_state(config, 1), config.eps)
            h = block.mixer(x, z, assignments)
        torch.testing.assert_close(delta, 0.008 * h, rtol=1e-6, atol=0)
        assert h.abs().amax() > 0


@pytest.mark.parametrize(
    "scope, trained",
    [("all", {"gate", "body"}), ("gate_only", {"gate"}), ("frozen", set())],
)
def test_trainability_scope_decides_which_tensors_get_grads(scope, trained):
    block = make_block("gated_cross_attn", clustering_method="soft_mos", trainable=scope)
    apply_scope(block)
    x = torch.randn(6, D, requires_grad=True)
    out, _ = block(x, torch.tensor([0, 6]))
    out.pow(2).sum().backward()
    groups = parameter_groups(block)
    assert {n for n, _ in block.writeback.named_parameters()} == (
        {"gate_value", "gate_proj", "gate_bias"})
    for group, params in groups.items():
        for param in params:
            if group in trained:
                assert param.grad is not None and param.grad.abs().sum() > 0
            else:
                assert param.grad is None and not param.requires_grad
    assert x.grad is not None  # gradient still flows to the host through a frozen block
