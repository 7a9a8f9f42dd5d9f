"""The paper's four configurations: one table, read by the registry, recipes and bench."""

from pathlib import Path

import pytest

from talan_serve.presets import PAPER_CONFIGS, count_parameters, preset
from talan_serve.registry import MODEL_ALIASES
from training.recipe import Recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_preset_size_at_real_host_shape(name):
    talan, backbone = count_parameters(name)
    paper_params = PAPER_CONFIGS[name].paper_talan_params
    assert talan / backbone < 0.01  # the paper's bar: under 1% of the backbone
    assert abs(talan - paper_params) / paper_params < 0.05  # Table 6's count, to its rounding


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_registry_and_recipe_read_the_table(name):
    row = PAPER_CONFIGS[name]
    alias = MODEL_ALIASES[row.model_name]
    assert (alias.base_model, alias.preset, alias.recipe) == (row.base_model, name, row.recipe)
    recipe = Recipe.load(REPO / row.recipe)
    assert recipe.base_model == row.base_model  # the recipe names no host of its own
    assert recipe.talan.preset == name
    width = row.host_fields["hidden_size"]
    assert recipe.talan.resolve(width) == preset(name)
    assert row.host_config().hidden_size == preset(name).hidden_size == width
