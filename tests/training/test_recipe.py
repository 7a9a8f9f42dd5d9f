"""Recipe schema and the shipped recipes: the paper's four configs and the demo pair."""

from __future__ import annotations

from pathlib import Path

import pytest

from talan_serve.presets import PRESETS
from training.audit import compare
from training.recipe import Recipe, RecipeError

RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"
PAPER = {  # Table 1 + Appendix B: seed, LR, WD, and the preset (Appendix C record)
    "q32b": (42, 2e-4, 0.0), "ds32b": (42, 2e-4, 0.0),
    "q8b": (42, 2e-4, 0.0), "moe": (46, 2.5e-5, 0.02),
}
HOST_WIDTH = {"q32b": 5120, "ds32b": 5120, "q8b": 4096, "moe": 2048}


@pytest.mark.parametrize("key", sorted(PAPER))
def test_paper_recipes_carry_the_paper_hyperparameters(key: str) -> None:
    recipe = Recipe.load(RECIPES / f"{key}-talan.yaml")
    seed, lr, wd = PAPER[key]
    assert (recipe.seed, recipe.data_seed, recipe.optim.lr, recipe.optim.weight_decay) == (
        seed, seed, lr, wd)
    assert (recipe.adapter.type, recipe.adapter.r, recipe.adapter.alpha) == ("lora", 32, 64.0)
    assert recipe.adapter.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    schedule = recipe.schedule
    assert (schedule.max_steps, schedule.per_device_batch_size) == (78, 4)
    # the paper's own numbers: 4 per device x 8 accumulation x 2 GPUs, DeepSpeed ZeRO-2
    assert (schedule.grad_accum, schedule.world_size) == (8, 2)
    assert recipe.distributed.engine == "deepspeed" and recipe.distributed.config is None
    assert (schedule.precision, schedule.gradient_checkpointing) == ("bf16", True)
    assert (recipe.optim.warmup_ratio, recipe.optim.max_grad_norm) == (0.1, 1.0)
    assert recipe.warmup_steps == 8
    config = recipe.talan.resolve(HOST_WIDTH[key])
    expected = dict(PRESETS[key])
    assert {k: getattr(config, k) for k in expected} == expected


def test_paper_axes_as_in_appendix_c() -> None:
    q8b = Recipe.load(RECIPES / "q8b-talan.yaml").talan.resolve(4096)
    assert (q8b.activate_steps, q8b.grad_scale, q8b.connection_point) == (20, 1000.0, "layer_4")
    moe = Recipe.load(RECIPES / "moe-talan.yaml").talan.resolve(2048)
    assert (moe.trainable, moe.freeze_steps, moe.clustering_method) == ("frozen", 35, "soft_mos")


def test_host_width_replaces_the_preset_width() -> None:
    recipe = Recipe.load(RECIPES / "q8b-talan.yaml")
    assert recipe.talan.resolve(576).hidden_size == 576


def test_demo_pair_differs_only_in_talan() -> None:
    talan = Recipe.load(RECIPES / "smollm2-talan-demo.yaml")
    lora = Recipe.load(RECIPES / "smollm2-lora-demo.yaml")
    assert lora.talan is None and talan.talan is not None
    differences = compare({"training": {"recipe": lora.to_dict()}},
                          {"training": {"recipe": talan.to_dict()}})
    assert differences and {d.kind for d in differences} == {"talan"}
    config = talan.talan.resolve(576)
    assert config.connection_point == "layer_4" and config.activate_steps is not None


@pytest.mark.parametrize(("patch", "message"), [
    ({"adapter": {"type": "ia3"}}, "adapter.type: unknown 'ia3'"),
    ({"optim": {"lr": 0}}, "lr must be > 0"),
    ({"schedule": {"max_step": 3}}, "unknown field.*max_step"),
    ({"schedule": {"precision": "fp16"}}, "precision: unknown 'fp16'"),
    ({"talan": {"preset": "q9b"}}, "talan.preset: unknown 'q9b'"),
    ({"seeds": 1}, "unknown field.*seeds"),
    ({"distributed": {"engine": "horovod"}}, "distributed.engine: unknown 'horovod'"),
    ({"distributed": {"engine": "ddp", "config": "x.json"}}, "DDP takes no config"),
    ({"tracking": {"report_to": "mlflow"}}, "report_to: unknown 'mlflow'"),
    ({"schedule": {"save_steps": 0}}, "save_steps must be > 0"),
    ({"schedule": {"eval_steps": 5}}, "eval_steps needs data.eval_file"),
])
def test_bad_recipes_are_refused(patch: dict, message: str) -> None:
    record = {"name": "x", "base_model": "m", "output_dir": "o",
              "data": {"train_file": "t.jsonl"}, **patch}
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(record)


def test_bad_talan_fields_are_refused_at_resolve() -> None:
    recipe = Recipe.from_dict({"name": "x", "base_model": "m", "output_dir": "o",
                               "data": {"train_file": "t"},
                               "talan": {"network_type": "mlp"}})
    with pytest.raises(RecipeError, match="unknown network_type 'mlp'"):
        recipe.talan.resolve(64)


def test_recipe_round_trips_through_yaml(tmp_path: Path) -> None:
    recipe = Recipe.load(RECIPES / "smollm2-talan-demo.yaml")
    copy = tmp_path / "r.yaml"
    copy.write_text(recipe.to_yaml())
    assert Recipe.load(copy).to_dict() == recipe.to_dict()


DEMO_RUNS = RECIPES.parents[1] / "checkpoints"


@pytest.mark.skipif(not (DEMO_RUNS / "smollm2-talan-demo" / "run_manifest.json").is_file(),
                    reason="the demo checkpoints are not in this tree")
def test_committed_demo_pair_is_matched_and_its_data_regenerates(tmp_path: Path) -> None:
    import json

    from talan_serve.checkpoint import sha256_file
    from training.arithmetic import write_splits
    from training.audit import audit

    differences, _ = audit(str(DEMO_RUNS / "smollm2-lora-demo"),
                           str(DEMO_RUNS / "smollm2-talan-demo"))
    assert differences and {d.kind for d in differences} == {"talan"}
    manifest = json.loads((DEMO_RUNS / "smollm2-talan-demo" / "run_manifest.json").read_text())
    data = manifest["training"]["recipe"]["data"]
    write_splits(tmp_path / "train.jsonl", data["generate_train"], data["generate_heldout"],
                 data["generate_seed"])
    assert sha256_file(tmp_path / "train.jsonl") == manifest["training"]["data"]["sha256"]
