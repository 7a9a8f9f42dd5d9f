import json

import pytest

from talan_serve.config import TalanConfig, TalanConfigError
from talan_serve.presets import PRESETS, preset

# The paper's Appendix C records, verbatim.
APPENDIX_C = {
    "q32b": """{
      "type": "talan", "clustering_method": "attention",
      "n_themes": 2, "network_type": "multihead_local",
      "integration_type": "learned_gate", "gate_type": "vector",
      "alpha": 0.008, "freeze_steps": 0,
      "connection_point": "layer_12", "hidden_size": 5120
    }""",
    "ds32b": """{
      "type": "talan", "clustering_method": "attention",
      "n_themes": 2, "network_type": "cross_attn",
      "integration_type": "learned_gate", "gate_type": "vector",
      "alpha": 0.001, "freeze_steps": 0,
      "connection_point": "embedding", "hidden_size": 5120
    }""",
    "q8b": """{
      "type": "talan", "clustering_method": "attention",
      "n_themes": 2, "network_type": "per_token_mix",
      "integration_type": "learned_gate", "gate_type": "vector",
      "alpha": 0.0015, "freeze_steps": 0,
      "connection_point": "layer_4", "hidden_size": 4096
    }""",
    "moe": """{
      "type": "talan", "clustering_method": "soft_mos",
      "n_themes": 6, "network_type": "multihead_local",
      "integration_type": "learned_gate", "gate_type": "scalar",
      "alpha": 0.008, "freeze_steps": 35,
      "connection_point": "embedding", "hidden_size": 2048
    }""",
}

# Table 1: trainability scope and gradient scale of each audited configuration.
TABLE_1 = {
    "q32b": ("all", 500.0, None),
    "ds32b": ("all", 500.0, None),
    "q8b": ("all", 1000.0, 20),
    "moe": ("frozen", 1.0, None),
}


@pytest.mark.parametrize("name", sorted(APPENDIX_C))
def test_appendix_c_records_load_verbatim_and_match_presets(name, tmp_path):
    record = json.loads(APPENDIX_C[name])
    config = TalanConfig.from_dict(record)
    for key, value in record.items():
        assert getattr(config, key) == value
    ours = preset(name)
    for key, value in record.items():
        assert getattr(ours, key) == value, key
    assert (ours.trainable, ours.grad_scale, ours.activate_steps) == TABLE_1[name]
    (tmp_path / "talan_config.json").write_text(APPENDIX_C[name])
    assert TalanConfig.load(tmp_path) == config


def test_json_round_trip(tmp_path):
    config = preset("q8b", mixer_dim=128)
    config.save(tmp_path)
    assert TalanConfig.load(tmp_path / "talan_config.json") == config
    assert TalanConfig.from_dict(json.loads(config.to_json_string())) == config


def test_layer_index_and_state_size():
    assert TalanConfig(hidden_size=8, connection_point="embedding").layer_index is None
    assert TalanConfig(hidden_size=8, connection_point="layer_12").layer_index == 12
    assert TalanConfig(hidden_size=8, n_themes=3).state_size == 3 * 9


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(network_type="transformer"), "unknown network_type 'transformer'"),
        (dict(clustering_method="kmeans"), "unknown clustering_method 'kmeans'"),
        (dict(integration_type="add"), "unknown integration_type 'add'"),
        (dict(gate_type="matrix"), "unknown gate_type 'matrix'"),
        (dict(trainable="some"), "unknown trainable 'some'"),
        (dict(connection_point="layer_x"), "bad connection_point 'layer_x'"),
        (dict(connection_point="layer_-1"), "bad connection_point 'layer_-1'"),
        (dict(connection_point="lm_head"), "bad connection_point 'lm_head'"),
        (dict(alpha=0.0), "alpha must be > 0"),
        (dict(alpha=-0.1), "alpha must be > 0"),
        (dict(n_themes=0), "n_themes must be an integer >= 1"),
        (dict(hidden_size=0), "hidden_size must be a positive integer"),
        (dict(mixer_dim=30, num_heads=4), "num_heads (4) must divide mixer_dim (30)"),
        (dict(grad_scale=0), "grad_scale must be > 0"),
        (dict(freeze_steps=-1), "freeze_steps must be an integer >= 0"),
        (dict(activate_steps=-5), "activate_steps must be null or an integer >= 0"),
        (dict(type="lora"), "type must be 'talan'"),
    ],
)
def test_bad_fields_are_refused_with_the_reason(overrides, message):
    fields = dict(hidden_size=64, mixer_dim=32, num_heads=4)
    fields.update(overrides)
    with pytest.raises(TalanConfigError) as err:
        TalanConfig(**fields)
    assert message in str(err.value)


def test_unknown_field_and_bad_json(tmp_path):
    with pytest.raises(TalanConfigError, match="unknown field.*n_slots"):
        TalanConfig.from_dict({"hidden_size": 8, "n_slots": 2})
    with pytest.raises(TalanConfigError, match="missing required field hidden_size"):
        TalanConfig.from_dict({"n_themes": 2})
    (tmp_path / "talan_config.json").write_text("{not json")
    with pytest.raises(TalanConfigError, match="not valid JSON"):
        TalanConfig.load(tmp_path)


def test_host_fit_errors_name_the_mismatch():
    config = TalanConfig(hidden_size=4096, connection_point="layer_40")
    with pytest.raises(TalanConfigError, match="hidden_size 4096 does not fit.*5120"):
        config.check_host(5120, 64)
    with pytest.raises(TalanConfigError, match="has 36 decoder layers"):
        config.check_host(4096, 36)
    config.check_host(4096, 41)


def test_unknown_preset_lists_known():
    with pytest.raises(TalanConfigError, match="known presets: q32b, ds32b, q8b, moe"):
        preset("q70b")
    assert set(PRESETS) == {"q32b", "ds32b", "q8b", "moe"}
