"""Checkpoint round trip, corruption errors, and load_reference with a PEFT adapter."""

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save, save_file
from transformers import AutoModelForCausalLM

from talan_serve.checkpoint import (
    MANIFEST_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    check_finite,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
)
from talan_serve.reference import find_talan, load_reference, talan_disabled
from talan_serve.testing import build_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "talan"
    return build_tiny_checkpoint(tiny_model("qwen3"), out, connection_point="layer_2",
                                 network_type="gated_cross_attn", clustering_method="soft_mos")


@pytest.fixture
def broken(checkpoint, tmp_path):
    """A private copy of the checkpoint to corrupt."""
    copy = tmp_path / "copy"
    shutil.copytree(checkpoint, copy)
    return copy


def rewrite_weights(path, mutate):
    tensors = load_file(str(path / WEIGHTS_NAME))
    mutate(tensors)
    save_file(tensors, str(path / WEIGHTS_NAME))
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    manifest["files"][WEIGHTS_NAME] = sha256_file(path / WEIGHTS_NAME)
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_round_trip_is_bit_exact(checkpoint, tiny_model, tmp_path):
    model, _ = load_reference(tiny_model("qwen3"), talan=checkpoint)
    block = find_talan(model)
    saved = save_checkpoint(tmp_path / "again", str(tiny_model("qwen3")), block=block,
                            peft_model=model)
    first, second = load_checkpoint(checkpoint), load_checkpoint(saved)
    assert first.config == second.config
    assert first.state_dict.keys() == second.state_dict.keys()
    for name, tensor in first.state_dict.items():
        assert torch.equal(tensor, second.state_dict[name]), name
    for name in ("adapter_model.safetensors",):
        a, b = load_file(str(checkpoint / name)), load_file(str(saved / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def test_reference_composes_talan_with_lora_and_off_switch_is_lora_only(checkpoint, tiny_model):
    model, tokenizer = load_reference(tiny_model("qwen3"), talan=checkpoint)
    ids = tokenizer("Three apples plus two apples equals", return_tensors="pt").input_ids
    host = AutoModelForCausalLM.from_pretrained(tiny_model("qwen3"), dtype=torch.float32)
    base_logits = host(ids).logits
    lora_only = PeftModel.from_pretrained(host, str(checkpoint)).eval()
    lora_logits = lora_only(ids).logits
    assert (lora_logits - base_logits).abs().amax() > 1e-3  # the LoRA is not a no-op
    talan_logits = model(ids).logits
    assert (talan_logits - lora_logits).abs().amax() > 1e-3
    with talan_disabled(model):
        torch.testing.assert_close(model(ids).logits, lora_logits, rtol=0, atol=0)


@torch.no_grad()
def test_dora_adapter_composes(tiny_model, tmp_path):
    ckpt = build_tiny_checkpoint(tiny_model("llama"), tmp_path / "dora", use_dora=True)
    assert json.loads((ckpt / "adapter_config.json").read_text())["use_dora"] is True
    model, tokenizer = load_reference(tiny_model("llama"), talan=ckpt)
    ids = tokenizer("The answer is", return_tensors="pt").input_ids
    host = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32)
    dora_only = PeftModel.from_pretrained(host, str(ckpt)).eval()
    with talan_disabled(model):
        torch.testing.assert_close(model(ids).logits, dora_only(ids).logits, rtol=0, atol=0)


def test_lora_only_twin_has_no_talan(tiny_model, tmp_path):
    ckpt = build_tiny_checkpoint(tiny_model("qwen3"), tmp_path / "lora", talan=False)
    loaded = load_checkpoint(ckpt)
    assert not loaded.has_talan and loaded.adapter_dir == ckpt
    model, _ = load_reference(tiny_model("qwen3"), talan=ckpt)
    assert find_talan(model) is None


def test_missing_tensor(broken):
    rewrite_weights(broken, lambda t: t.pop("summarize.slot_queries"))
    with pytest.raises(CheckpointError, match="missing TALAN tensor.*summarize.slot_queries"):
        load_checkpoint(broken)


def test_unexpected_tensor(broken):
    rewrite_weights(broken, lambda t: t.update({"mixer.extra": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected TALAN tensor.*mixer.extra"):
        load_checkpoint(broken)


def test_wrong_shape(broken):
    rewrite_weights(broken, lambda t: t.update({"mixer.key.weight": torch.zeros(7, 128)}))
    expected = r"mixer.key.weight has shape \(7, 128\).*\(32, 128\)"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(broken)


def test_wrong_dtype(broken):
    rewrite_weights(broken, lambda t: t.update(
        {"writeback.gate_bias": t["writeback.gate_bias"].half()}))
    with pytest.raises(CheckpointError, match="gate_bias is torch.float16, expected torch.float32"):
        load_checkpoint(broken)


def test_checksum_mismatch(broken):
    with open(broken / WEIGHTS_NAME, "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(CheckpointError, match="talan_model.safetensors: checksum mismatch"):
        load_checkpoint(broken)


def test_hidden_size_or_layer_that_does_not_fit_the_host(checkpoint, tiny_model):
    with pytest.raises(CheckpointError, match="hidden_size 128 does not fit.*4096"):
        load_checkpoint(checkpoint, hidden_size=4096, num_layers=36)
    with pytest.raises(CheckpointError, match="'layer_2' does not fit.*has 2 decoder layers"):
        load_checkpoint(checkpoint, hidden_size=128, num_layers=2)


def test_unreadable_json(broken):
    (broken / MANIFEST_NAME).write_text("{oops")
    with pytest.raises(CheckpointError, match="talan_manifest.json: unreadable JSON"):
        load_checkpoint(broken)


def test_unreadable_config_json(broken):
    (broken / "talan_config.json").write_text("{oops")
    manifest = json.loads((broken / MANIFEST_NAME).read_text())
    manifest["files"]["talan_config.json"] = sha256_file(broken / "talan_config.json")
    (broken / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="talan_config.json.*not valid JSON"):
        load_checkpoint(broken)


def test_missing_file_and_missing_manifest(broken, tmp_path):
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing file adapter_model.safetensors"):
        load_checkpoint(broken)
    (broken / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match="missing talan_manifest.json"):
        load_checkpoint(broken)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("tensors, refused", [
    # Finite float64 values whose sum overflows: the summed check says "maybe", each
    # tensor's elements say finite.
    ({"a": torch.full((2,), 1e308, dtype=torch.float64)}, None),
    # +inf and -inf in one section sum to NaN; a NaN in a float16 file.
    ({"a": torch.tensor([1.0, float("inf")]), "b": torch.tensor([float("-inf")])}, "a"),
    ({"a": torch.zeros(3, dtype=torch.float16), "b": torch.tensor([0.0, float("nan")],
                                                                  dtype=torch.float16)}, "b"),
    # Two dtypes: no single view of the section; each tensor is checked.
    ({"a": torch.zeros(2), "b": torch.tensor([float("nan")], dtype=torch.float64)}, "b"),
])
def test_check_finite_over_a_files_data_section(tensors, refused, tmp_path):
    data = save(tensors)
    if refused is None:
        check_finite(tmp_path, tensors, data)
    else:
        with pytest.raises(CheckpointError, match=f"tensor {refused} is not finite"):
            check_finite(tmp_path, tensors, data)
