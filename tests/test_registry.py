import pytest

from talan_serve.registry import (
    MODEL_ALIASES,
    MissingCheckpointError,
    UnknownModelError,
    resolve_model,
)
from talan_serve.testing import build_tiny_checkpoint


def test_paper_aliases_name_their_hosts_and_presets():
    assert MODEL_ALIASES["q8b-talan"].base_model == "Qwen/Qwen3-8B"
    assert MODEL_ALIASES["q8b-talan"].preset == "q8b"
    assert {a.preset for a in MODEL_ALIASES.values()} >= {"q32b", "ds32b", "q8b", "moe"}


def test_missing_checkpoint_says_how_to_make_it(tmp_path):
    with pytest.raises(MissingCheckpointError) as err:
        resolve_model("q8b-talan", root=tmp_path)
    message = str(err.value)
    assert f"no checkpoint at {tmp_path / 'q8b-talan'}" in message
    command = f"talan-train training/recipes/q8b-talan.yaml --output {tmp_path / 'q8b-talan'}"
    assert command in message


def test_unknown_name_lists_the_known_ones(tmp_path):
    with pytest.raises(UnknownModelError) as err:
        resolve_model("gpt-9", root=tmp_path)
    for name in MODEL_ALIASES:
        assert name in str(err.value)


def test_alias_checkpoint_dir_and_plain_dirs_resolve(tiny_model, tmp_path):
    host = tiny_model("qwen3")
    ckpt = build_tiny_checkpoint(host, tmp_path / "q8b-talan")
    resolved = resolve_model("q8b-talan", root=tmp_path)
    assert resolved.checkpoint == ckpt
    by_path = resolve_model(ckpt)
    assert by_path.checkpoint == ckpt and by_path.base_model == host
    plain = resolve_model(host)
    assert plain.checkpoint is None and plain.base_model == host
