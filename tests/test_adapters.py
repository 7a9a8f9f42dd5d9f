"""Many adapters over one stream: every row gets exactly its own block's result."""

import numpy as np
import pytest
import torch

from talan_serve.adapter_set import TalanAdapterSet
from talan_serve.adapter_spec import AdapterSetError, AdapterSetSpec
from talan_serve.block import TalanBlock
from talan_serve.config import TalanConfig
from talan_serve.stacks import stack_blocks
from talan_serve.step_plan import plan_groups
from talan_serve.switch import NO_ADAPTER
from talan_serve.testing import randomize_gate

D = 16
CONFIGS = {
    3: dict(network_type="cross_attn", n_themes=2, connection_point="layer_1",
            integration_type="direct"),
    5: dict(network_type="per_token_mix", n_themes=4, connection_point="layer_1",
            clustering_method="soft_mos"),
    8: dict(network_type="multihead_local", n_themes=3, connection_point="embedding"),
}


def _adapters(seed=0):
    blocks = {}
    for adapter, fields in CONFIGS.items():
        torch.manual_seed(seed + adapter)
        config = TalanConfig(hidden_size=D, mixer_dim=8, num_heads=2, alpha=0.4, **fields)
        block = TalanBlock(config)
        randomize_gate(block, adapter)
        blocks[adapter] = block
    spec = AdapterSetSpec.covering([b.config for b in blocks.values()], D, max_adapters=4)
    adapters = TalanAdapterSet(spec)
    for adapter, block in blocks.items():
        adapters.add(adapter, block.config, block.state_dict())
    return blocks, adapters


def _run(adapters, point, hidden, lengths, rows, initial):
    cu_cpu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    one_token = all(n == 1 for n in lengths)
    cu = None if one_token else torch.from_numpy(cu_cpu)
    groups = plan_groups(np.array(rows, dtype=np.int64), None if one_token else cu_cpu, cu,
                         torch.device("cpu"), adapters.adapters_at(point))
    return adapters.perturbation(hidden, cu, initial, groups)


@pytest.mark.parametrize("point", ["layer_1", "embedding"])
@pytest.mark.parametrize("lengths", [[3, 1, 5, 2, 4, 1], [1] * 6])
def test_each_row_equals_its_adapter_alone(point, lengths):
    blocks, adapters = _adapters()
    rows = [3, NO_ADAPTER, 5, 8, 3, 5]
    torch.manual_seed(1)
    hidden = torch.randn(sum(lengths), D)
    initial = torch.rand(len(lengths), *adapters.state_shape)
    initial[..., -1] += 1.0
    delta, final = _run(adapters, point, hidden, lengths, rows, initial)

    start = 0
    for row, (adapter, length) in enumerate(zip(rows, lengths, strict=True)):
        tokens = slice(start, start + length)
        start += length
        block = blocks.get(adapter)
        if block is None or block.config.connection_point != point:
            # Another point's adapter, or none: the base model here, state untouched.
            assert torch.equal(delta[tokens], torch.zeros(length, D))
            assert torch.equal(final[row], initial[row])
            continue
        themes = block.config.n_themes
        cu = torch.tensor([0, length])
        want_delta, want_state = block.perturbation(hidden[tokens], cu,
                                                    initial[row:row + 1, :themes])
        torch.testing.assert_close(delta[tokens], want_delta, rtol=0, atol=1e-6)
        torch.testing.assert_close(final[row, :themes], want_state[0], rtol=0, atol=1e-6)
        # Slots beyond the adapter's own T are never written.
        assert torch.equal(final[row, themes:], initial[row, themes:])


def test_one_adapter_on_every_row_is_the_block_itself():
    blocks, adapters = _adapters()
    hidden = torch.randn(7, D)
    initial = torch.zeros(3, *adapters.state_shape)
    delta, final = _run(adapters, "layer_1", hidden, [2, 4, 1], [5, 5, 5], initial)
    want, state = blocks[5].perturbation(hidden, torch.tensor([0, 2, 6, 7]),
                                         initial[:, :4])
    assert torch.equal(delta, want) and torch.equal(final, state)


def test_dense_path_matches_grouped_path():
    _, adapters = _adapters()
    rows = torch.tensor([5, 3, NO_ADAPTER, 3, 5])
    hidden = torch.randn(5, D)
    initial = torch.rand(5, *adapters.state_shape)
    grouped = _run(adapters, "layer_1", hidden, [1] * 5, rows.tolist(), initial)
    dense = adapters.dense_perturbation(hidden, initial, rows, "layer_1")
    for got, want in zip(dense, grouped, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_refusals_name_what_does_not_fit():
    _, adapters = _adapters()
    with pytest.raises(AdapterSetError, match="n_themes 9 is above the 4 state slots"):
        adapters.check(TalanConfig(hidden_size=D, n_themes=9, connection_point="layer_1"))
    with pytest.raises(AdapterSetError, match="connection_point 'layer_2'"):
        adapters.check(TalanConfig(hidden_size=D, connection_point="layer_2"))
    with pytest.raises(AdapterSetError, match="hidden_size 32"):
        adapters.check(TalanConfig(hidden_size=32, connection_point="layer_1"))
    with pytest.raises(AdapterSetError, match="loaded already"):
        adapters.add(3, adapters.block(3).config, adapters.block(3).state_dict())


def test_stacked_block_runs_each_token_through_its_own_adapter():
    """Same kind, different T and weights: one stacked call equals each block alone."""
    blocks = []
    for seed, themes in enumerate((2, 5, 3)):
        torch.manual_seed(seed)
        config = TalanConfig(hidden_size=D, mixer_dim=8, num_heads=2, alpha=0.2 + seed,
                             n_themes=themes, network_type="gated_cross_attn",
                             clustering_method="soft_mos")
        block = TalanBlock(config)
        randomize_gate(block, seed)
        blocks.append(block)
    stack = stack_blocks(blocks)
    entries = torch.tensor([1, 0, 2, 1, 0])
    hidden = torch.randn(5, D)
    initial = torch.zeros(5, 5, D + 1)
    initial[..., :] = torch.rand(5, 5, D + 1)
    for row, position in enumerate(entries.tolist()):  # a stacked state: zero past its own T
        initial[row, blocks[position].config.n_themes:] = 0.0
    delta, state = stack.perturbation(hidden, None, initial, entries=entries)
    for row, position in enumerate(entries.tolist()):
        themes = blocks[position].config.n_themes
        want, want_state = blocks[position].perturbation(hidden[row:row + 1], None,
                                                         initial[row:row + 1, :themes])
        torch.testing.assert_close(delta[row:row + 1], want, rtol=0, atol=1e-5)
        torch.testing.assert_close(state[row, :themes], want_state[0], rtol=0, atol=1e-5)
        assert torch.equal(state[row, themes:], torch.zeros_like(state[row, themes:]))


@pytest.mark.parametrize("network_type", ["multihead_local", "cross_attn", "per_token_mix"])
def test_set_stacks_same_kind_adapters_for_one_token_steps(network_type):
    blocks = {}
    for adapter, themes in ((4, 2), (6, 4), (9, 3)):
        torch.manual_seed(adapter)
        config = TalanConfig(hidden_size=D, mixer_dim=8, num_heads=2, n_themes=themes,
                             network_type=network_type, integration_type="direct",
                             connection_point="layer_1", alpha=0.1 * adapter)
        blocks[adapter] = TalanBlock(config)
    adapters = TalanAdapterSet(AdapterSetSpec.covering([b.config for b in blocks.values()], D,
                                                       max_adapters=4))
    for adapter, block in blocks.items():
        adapters.add(adapter, block.config, block.state_dict())
    assert len(adapters.stacks) == 1
    rows = np.array([6, 4, NO_ADAPTER, 9, 6, 4], dtype=np.int64)
    groups = plan_groups(rows, None, None, torch.device("cpu"), [4, 6, 9], adapters.stack_of)
    assert [g.entries is not None for g in groups] == [True]
    hidden = torch.randn(6, D)
    initial = torch.zeros(6, *adapters.state_shape)
    delta, final = adapters.perturbation(hidden, None, initial, groups)
    for row, adapter in enumerate(rows.tolist()):
        if adapter == NO_ADAPTER:
            assert torch.equal(delta[row], torch.zeros(D))
            continue
        themes = blocks[adapter].config.n_themes
        want, _ = blocks[adapter].perturbation(hidden[row:row + 1], None,
                                               initial[row:row + 1, :themes])
        torch.testing.assert_close(delta[row:row + 1], want, rtol=0, atol=1e-5)
    adapters.remove(6)
    assert set(adapters.stack_of) == {4, 9}


def test_decoding_rows_of_a_packed_step_are_stacked():
    """A step that prefills some rows and decodes others: the decoding rows of one kind
    run stacked, the rest per adapter, and every row still equals its block alone."""
    blocks = {}
    for adapter, themes in ((4, 2), (6, 4), (7, 3)):
        torch.manual_seed(adapter)
        config = TalanConfig(hidden_size=D, mixer_dim=8, num_heads=2, n_themes=themes,
                             connection_point="layer_1", alpha=0.3)
        blocks[adapter] = TalanBlock(config)
        randomize_gate(blocks[adapter], adapter)
    adapters = TalanAdapterSet(AdapterSetSpec.covering([b.config for b in blocks.values()], D,
                                                       max_adapters=4))
    for adapter, block in blocks.items():
        adapters.add(adapter, block.config, block.state_dict())
    rows, lengths = [4, 6, 6, NO_ADAPTER, 4, 7], [1, 1, 5, 2, 3, 1]
    cu_cpu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    groups = plan_groups(np.array(rows), cu_cpu, torch.from_numpy(cu_cpu),
                         torch.device("cpu"), [4, 6, 7], adapters.stack_of)
    assert sorted(g.entries is not None for g in groups) == [False, False, True]
    # Fewer than MIN_STACKED adapters present: one plain call each.
    assert all(g.entries is None for g in plan_groups(
        np.array(rows[:5]), cu_cpu[:6], None, torch.device("cpu"), [4, 6, 7],
        adapters.stack_of))
    hidden = torch.randn(int(cu_cpu[-1]), D)
    initial = torch.rand(6, *adapters.state_shape)
    for row, adapter in enumerate(rows):  # a resumed state: zero past the adapter's own T
        if adapter != NO_ADAPTER:
            initial[row, blocks[adapter].config.n_themes:] = 0.0
    delta, final = adapters.perturbation(hidden, torch.from_numpy(cu_cpu), initial, groups)
    for row, adapter in enumerate(rows):
        tokens = slice(int(cu_cpu[row]), int(cu_cpu[row + 1]))
        if adapter == NO_ADAPTER:
            assert torch.equal(final[row], initial[row])
            continue
        themes = blocks[adapter].config.n_themes
        want, state = blocks[adapter].perturbation(
            hidden[tokens], torch.tensor([0, lengths[row]]), initial[row:row + 1, :themes])
        torch.testing.assert_close(delta[tokens], want, rtol=0, atol=1e-5)
        torch.testing.assert_close(final[row, :themes], state[0], rtol=0, atol=1e-5)


def _kind(network_type, themes, alpha, point="layer_1"):
    return TalanConfig(hidden_size=D, mixer_dim=8, num_heads=2, n_themes=themes,
                       network_type=network_type, connection_point=point, alpha=alpha,
                       clustering_method="soft_mos")


def _block(config, seed):
    torch.manual_seed(seed)
    block = TalanBlock(config)
    randomize_gate(block, seed)
    return block


@torch.no_grad()
def test_a_captured_step_serves_adapters_loaded_after_the_capture():
    """The dense step traced once (``make_fx``: shapes, ops and the tensors it reads are
    fixed, as in a CUDA graph; no device sync can trace) serves adapters loaded and unloaded
    afterwards, because loads fill the fixed-capacity stacks in place."""
    from torch.fx.experimental.proxy_tensor import make_fx

    start = {1: _block(_kind("cross_attn", 2, 0.3), 1),
             2: _block(_kind("per_token_mix", 3, 0.5), 2)}
    spec = AdapterSetSpec.covering([b.config for b in start.values()], D, state_slots=4,
                                   max_adapters=3)
    adapters = TalanAdapterSet(spec)
    for adapter, block in start.items():
        adapters.add(adapter, block.config, block.state_dict())
    hidden = torch.randn(6, D)
    initial = torch.rand(6, *adapters.state_shape)
    captured = make_fx(lambda h, s, r: adapters.dense_perturbation(h, s, r, "layer_1"))(
        hidden, initial, torch.tensor([1, 2, NO_ADAPTER, 1, 2, 1]))
    adapters.seal()

    later = {5: _block(_kind("cross_attn", 4, 0.7), 5),
             6: _block(_kind("per_token_mix", 1, 0.2), 6)}
    for adapter, block in later.items():
        adapters.add(adapter, block.config, block.state_dict())
    adapters.remove(1)
    blocks = {2: start[2], **later}
    rows = [5, 2, NO_ADAPTER, 6, 1, 5]  # 1 is gone: its rows now run nothing
    delta, final = captured(hidden, initial, torch.tensor(rows))
    for row, adapter in enumerate(rows):
        if adapter not in blocks:
            assert torch.equal(delta[row], torch.zeros(D))
            assert torch.equal(final[row], initial[row])
            continue
        themes = blocks[adapter].config.n_themes
        want, state = blocks[adapter].perturbation(hidden[row:row + 1], None,
                                                   initial[row:row + 1, :themes])
        torch.testing.assert_close(delta[row:row + 1], want, rtol=0, atol=1e-5)
        torch.testing.assert_close(final[row, :themes], state[0], rtol=0, atol=1e-5)

    # A kind the captured step does not hold is refused once the set is sealed.
    with pytest.raises(AdapterSetError, match="captures its decode steps in CUDA graphs"):
        adapters.add(9, _kind("multihead_local", 2, 0.1), {})


def test_spec_records_kinds_and_capacity():
    configs = [_kind("cross_attn", 2, 0.3), _kind("cross_attn", 4, 0.9),
               _kind("per_token_mix", 3, 0.5, point="embedding")]
    spec = AdapterSetSpec.covering(configs, D, max_adapters=5)
    assert spec.max_adapters == 5 and spec.state_slots == 4
    assert [(k.network_type, k.connection_point, k.n_themes) for k in spec.kinds] == [
        ("cross_attn", "layer_1", 4), ("per_token_mix", "embedding", 4)]
    assert AdapterSetSpec.from_dict(spec.to_dict()) == spec
    spec.check(_kind("cross_attn", 1, 0.1), kinds_fixed=True)
    with pytest.raises(AdapterSetError, match="per_token_mix/soft_mos/learned_gate at "
                                              "layer_1"):
        spec.check(_kind("per_token_mix", 1, 0.1), kinds_fixed=True)
    spec.check(_kind("per_token_mix", 1, 0.1))  # an eager engine takes any kind
