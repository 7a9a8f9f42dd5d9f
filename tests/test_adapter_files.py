"""``talan_serve.adapter_files``: a checkpoint validated whole before a server loads it.

Each way a checkpoint can be bad is refused with its own message (and nothing else is);
a good one comes back with exactly its files' bytes, the ones that were validated, which
cross into an engine unchanged.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from talan_serve.adapter_files import (
    BaseWeights,
    read_adapter,
    tensors_from_bytes,
)
from talan_serve.checkpoint import WEIGHTS_NAME, CheckpointError
from talan_serve.testing import build_tiny_checkpoint, reseal_checkpoint, reweight_checkpoint

LORA = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def base(tiny_model):
    return BaseWeights.read(tiny_model("qwen3"))


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    return build_tiny_checkpoint(tiny_model("qwen3"), tmp_path_factory.mktemp("ckpt") / "a",
                                 network_type="cross_attn")


@pytest.fixture
def broken(checkpoint, tmp_path):
    return shutil.copytree(checkpoint, tmp_path / "broken")


def edit(path, file, change):
    tensors = load_file(str(path / file))
    change(tensors)
    save_file(tensors, str(path / file))
    reseal_checkpoint(path)


def lora_key(tensors, suffix="q_proj.lora_A.weight"):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def test_base_weights_come_from_the_headers(base):
    assert (base.hidden_size, base.num_layers) == (128, 4)
    assert base.shapes["model.layers.0.self_attn.q_proj.weight"] == (128, 128)
    assert base.shapes["model.layers.0.self_attn.k_proj.weight"] == (64, 128)


def test_a_good_checkpoint_comes_back_with_its_tensors(checkpoint, base):
    weights = read_adapter(checkpoint, base, within=checkpoint.parent)
    on_disk = load_file(str(checkpoint / LORA))
    assert weights.lora_rank == 4 and weights.config.network_type == "cross_attn"
    assert weights.lora.keys() == on_disk.keys()
    assert all(torch.equal(weights.lora[k], on_disk[k]) for k in on_disk)
    # What an engine receives is the files' bytes as they were checksummed.
    assert weights.talan_file == (checkpoint / WEIGHTS_NAME).read_bytes()
    assert weights.lora_file == (checkpoint / LORA).read_bytes()
    assert weights.nbytes == len(weights.talan_file) + len(weights.lora_file)
    talan, sent = load_file(str(checkpoint / WEIGHTS_NAME)), tensors_from_bytes(weights.talan_file)
    assert sent.keys() == talan.keys()
    assert all(torch.equal(sent[k], talan[k]) for k in talan)


@pytest.mark.parametrize("tensors", [
    {"a": torch.randn(3, 4), "b": torch.tensor(2.0), "empty": torch.zeros(0, 4),
     "c": torch.randn(5)},
    {"a": torch.randn(3, 4), "half": torch.randn(3).to(torch.bfloat16)},
    {"empty": torch.zeros(0)},
], ids=["one-dtype", "two-dtypes", "no-data"])
def test_bytes_decode_to_the_tensors_written(tensors):
    """Tensors of one dtype come back as views of one buffer (SGLang's serializer sends
    one block of shared memory for them, not one per tensor); other files as safetensors
    decodes them."""
    from safetensors.torch import save

    got = tensors_from_bytes(save(tensors))
    assert got.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape
        assert torch.equal(got[name], tensor) and got[name].is_contiguous()
    buffers = {t.untyped_storage().data_ptr() for t in got.values()}
    assert len(buffers) == (1 if len({t.dtype for t in tensors.values()}) == 1 else 2)


def test_another_adapter_of_the_kind_differs_in_every_tensor(checkpoint, base, tmp_path):
    other = read_adapter(reweight_checkpoint(checkpoint, tmp_path / "b", seed=1), base)
    first = read_adapter(checkpoint, base)
    assert other.config == first.config
    theirs = tensors_from_bytes(other.talan_file)
    for name, tensor in tensors_from_bytes(first.talan_file).items():
        assert theirs[name].shape == tensor.shape
        assert not torch.equal(theirs[name], tensor), name


@pytest.mark.parametrize("file", [WEIGHTS_NAME, LORA])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", [0, -1], ids=["first", "last"])
def test_a_tensor_that_is_not_finite(broken, base, file, value, where):
    """At either end of the file's data section (which is summed at once first), the
    refusal names the tensor."""
    name = ""

    def poison(tensors):
        nonlocal name
        name = sorted(tensors)[where]  # safetensors writes tensors in name order
        tensors[name].view(-1)[where] = value

    edit(broken, file, poison)
    with pytest.raises(CheckpointError, match=rf"tensor {name} is not finite \(1 NaN or "
                                              "infinite value"):
        read_adapter(broken, base)


def test_pickles_are_refused_before_anything_is_read(broken, base):
    torch.save({"x": torch.zeros(1)}, broken / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="adapter_model.bin: pickle files are refused"):
        read_adapter(broken, base)


def test_a_missing_safetensors_file_beside_its_pickle_says_so(broken):
    from talan_serve.checkpoint import load_checkpoint

    (broken / WEIGHTS_NAME).rename(broken / "talan_model.pt")
    with pytest.raises(CheckpointError, match="talan_model.pt is a pickle, and talan-serve "
                                              "reads only safetensors"):
        load_checkpoint(broken)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.__setitem__(lora_key(t), torch.zeros(4, 96)),
     r"q_proj: lora_A \(4, 96\) and lora_B \(128, 4\) do not fit the base model's weight "
     r"\(128, 128\)"),
    (lambda t: t.__setitem__(lora_key(t).replace("q_proj", "gate_proj"), torch.zeros(4, 128)),
     "gate_proj has lora_A without its lora_B"),
    (lambda t: t.__setitem__("base_model.model.model.nowhere.lora_A.weight",
                             torch.zeros(4, 128)) or t.__setitem__(
        "base_model.model.model.nowhere.lora_B.weight", torch.zeros(128, 4)),
     "model.nowhere is not a linear layer of the base model"),
    (lambda t: t.__setitem__("base_model.model.lm_head.modules_to_save.weight",
                             torch.zeros(1)), "unexpected tensor"),
    (lambda t: [t.__setitem__(lora_key(t, s), torch.zeros(2, 128) if "A" in s
                              else torch.zeros(128, 2))
                for s in ("q_proj.lora_A.weight", "q_proj.lora_B.weight")],
     "has rank 2, the config's r is 4"),
])
def test_a_lora_that_does_not_fit_the_base(broken, base, change, message):
    edit(broken, LORA, change)
    with pytest.raises(CheckpointError, match=message):
        read_adapter(broken, base)


def test_dora_is_refused_by_name(broken, base):
    record = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**record, "use_dora": True}))
    reseal_checkpoint(broken)
    with pytest.raises(CheckpointError, match="DoRA adapters are served merged"):
        read_adapter(broken, base)


def test_a_config_that_does_not_fit_the_base(broken, base):
    record = json.loads((broken / "talan_config.json").read_text())
    (broken / "talan_config.json").write_text(json.dumps({**record,
                                                          "connection_point": "layer_9"}))
    reseal_checkpoint(broken)
    with pytest.raises(CheckpointError, match="has 4 decoder layers"):
        read_adapter(broken, base)


def test_symlinks_out_of_the_directory_are_refused(checkpoint, base, tmp_path):
    library = tmp_path / "library"
    library.mkdir()
    os.symlink(checkpoint, library / "whole")
    with pytest.raises(PermissionError, match="a symlink that leads out of"):
        read_adapter(library / "whole", base, within=library)
    inner = shutil.copytree(checkpoint, library / "inner")
    (inner / LORA).unlink()
    os.symlink(checkpoint / LORA, inner / LORA)
    with pytest.raises(PermissionError, match=f"{LORA}: a symlink that leads out of"):
        read_adapter(inner, base, within=library)
    inside = shutil.copytree(checkpoint, library / "inside")  # a link that stays is fine
    (inside / LORA).unlink()
    shutil.copy(checkpoint / LORA, library / "shared_lora.safetensors")
    os.symlink(library / "shared_lora.safetensors", inside / LORA)
    assert read_adapter(inside, base, within=library).lora_rank == 4
