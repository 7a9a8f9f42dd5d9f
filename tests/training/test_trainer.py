"""The recipe on transformers' Trainer: loss, data order, checks, tracking, held-out loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from talan_serve.checkpoint import load_checkpoint, save_checkpoint
from training.axes import TalanAxes
from training.data import IGNORE_INDEX, read_jsonl, tokenize_dataset
from training.distributed import (
    SHIPPED_CONFIGS,
    Launch,
    LaunchError,
    check,
    grad_accum_for,
    validate_deepspeed_config,
)
from training.model import build
from training.recipe import Recipe
from training.run import plan_run, run
from training.trainer import make_trainer, training_arguments

REPO = Path(__file__).resolve().parents[2]
ONE = Launch(world_size=1, rank=0, local_rank=0, launcher="python")
TWO = Launch(world_size=2, rank=0, local_rank=0, launcher="torchrun")


def _trainer(recipe: Recipe, examples: list, train_model=None):
    plan = plan_run(recipe, launch=ONE)
    train_model = train_model or build(recipe, plan.device)
    return make_trainer(recipe, training_arguments(recipe, plan), train_model, examples, None,
                        TalanAxes(train_model.block), [], None), train_model


def test_library_loss_is_the_assistant_token_mean_of_the_step_on_the_demo_data():
    """The model's own loss over num_items_in_batch, summed over the micro-batches of one
    step, equals the mean cross-entropy over every assistant token of the step."""
    from training.arithmetic import write_splits

    recipe = Recipe.load(REPO / "training/recipes/smollm2-talan-demo.yaml")
    recipe.output_dir = "/tmp/unused"
    if not Path(recipe.data.train_file).is_file():
        write_splits(recipe.data.train_file, recipe.data.generate_train,
                     recipe.data.generate_heldout, recipe.data.generate_seed)
    train_model = build(recipe, torch.device("cpu"))
    chats = read_jsonl(REPO / recipe.data.train_file)[:16]
    examples, _ = tokenize_dataset(train_model.tokenizer, chats, recipe.data.max_length)
    trainer, _ = _trainer(recipe, examples, train_model)
    micro = [trainer.data_collator(examples[i:i + 8]) for i in (0, 8)]
    count = trainer._get_num_items_in_batch(micro, torch.device("cpu"))
    model = train_model.model.eval()  # no dropout: both sides see the same forward
    with torch.no_grad():
        library = sum(trainer.compute_loss(model, dict(b), num_items_in_batch=count)
                      for b in micro)
        total, targets = 0.0, 0
        for batch in micro:
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="sum")
            targets += int((labels != IGNORE_INDEX).sum())
    assert int(count) == targets > 16 * 10
    torch.testing.assert_close(library, total / targets, rtol=1e-6, atol=0)


def test_data_order_follows_the_data_seed_and_splits_each_global_batch(make_recipe, tmp_path):
    recipe = make_recipe(tmp_path / "order", talan=None)
    train_model = build(recipe, torch.device("cpu"))
    examples = [type("E", (), {"input_ids": [i + 1], "labels": [i + 1]})() for i in range(16)]

    def order(data_seed: int) -> list[int]:
        recipe.data_seed = data_seed
        trainer, _ = _trainer(recipe, examples, train_model)
        return [int(x) for batch in trainer.get_train_dataloader()
                for x in batch["input_ids"][:, 0]]

    first = order(11)
    assert sorted(first) == list(range(1, 17)) and first == order(11)
    assert first != order(12)
    # accelerate's seedable sampler: a randperm seeded with data_seed (epoch 0)
    assert first == [i + 1 for i in torch.randperm(16, generator=torch.Generator()
                                                      .manual_seed(11)).tolist()]


def test_the_shipped_deepspeed_config_passes_deepspeed_own_checks(make_recipe, tmp_path):
    pytest.importorskip("deepspeed")
    recipe = make_recipe(tmp_path / "ds")
    recipe.distributed.engine = "deepspeed"
    config = json.loads((SHIPPED_CONFIGS / "zero2.json").read_text())
    filled = validate_deepspeed_config(config, recipe)
    assert filled["zero_optimization"]["stage"] == 2
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"],
            filled["gradient_clipping"]) == (4, 2, 1.0)
    # and its parser is not a rubber stamp
    with pytest.raises(LaunchError, match="DeepSpeed refuses"):
        validate_deepspeed_config({**config, "train_batch_size": 7}, recipe)


@pytest.mark.parametrize("change, message", [
    ({"distributed": {"engine": "fsdp"}}, "fsdp needs CUDA devices"),
    ({"distributed": {"engine": "deepspeed", "config": "{zero3}"}}, "stage 3 .*not supported"),
    ({"distributed": {"engine": "deepspeed", "config": "{optimizer}"}},
     "remove its 'optimizer' section"),
    ({"distributed": {"engine": "deepspeed", "config": "{missing}"}}, "does not exist"),
    ({"schedule": {"precision": "bf16"}}, "no CUDA device with bf16"),
])
def test_what_cannot_run_here_is_refused_before_any_model_loads(make_recipe, tmp_path,
                                                                monkeypatch, change, message):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    zero = json.loads((SHIPPED_CONFIGS / "zero2.json").read_text())
    configs = {"{zero3}": {**zero, "zero_optimization": {"stage": 3}},
               "{optimizer}": {**zero, "optimizer": {"type": "AdamW"}}}
    recipe = make_recipe(tmp_path / "bad")
    for section, values in change.items():
        for key, value in values.items():
            if value in configs:
                (tmp_path / "ds.json").write_text(json.dumps(configs[value]))
                value = str(tmp_path / "ds.json")
            elif value == "{missing}":
                value = str(tmp_path / "missing.json")
            setattr(getattr(recipe, section), key, value)
    with pytest.raises(LaunchError, match=message):
        check(recipe, TWO, cuda=False)


def test_deepspeed_on_cpu_needs_its_cpu_accelerator(make_recipe, tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    recipe = make_recipe(tmp_path / "ds")
    recipe.distributed.engine = "deepspeed"
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    with pytest.raises(LaunchError, match="set DS_ACCELERATOR=cpu"):
        check(recipe, TWO, cuda=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    check(recipe, TWO, cuda=False)


def test_an_accelerate_config_for_another_engine_is_refused(make_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(LaunchError, match="configured for deepspeed.*engine is ddp"):
        check(make_recipe(tmp_path / "r"), TWO, cuda=False)


def test_a_recipe_written_for_n_processes_keeps_its_effective_batch_only_on_request(
        make_recipe, tmp_path):
    recipe = make_recipe(tmp_path / "r", grad_accum=8, world_size=2)
    assert grad_accum_for(recipe, TWO, keep_effective_batch=False) == 8
    with pytest.raises(LaunchError, match=r"written for 2 process\(es\) \(effective batch 64 "
                                          r"= 4 x 8 x 2\); this launch has 1.*grad_accum 16"):
        grad_accum_for(recipe, ONE, keep_effective_batch=False)
    assert grad_accum_for(recipe, ONE, keep_effective_batch=True) == 16
    four = Launch(world_size=4, rank=0, local_rank=0, launcher="torchrun")
    assert grad_accum_for(recipe, four, keep_effective_batch=True) == 4
    three = Launch(world_size=3, rank=0, local_rank=0, launcher="torchrun")
    with pytest.raises(LaunchError, match="not a multiple"):
        grad_accum_for(recipe, three, keep_effective_batch=True)


def test_a_checkpoint_from_a_gathered_state_dict_equals_the_live_one(make_recipe, tmp_path):
    """What an engine that shards parameters hands ``_save`` (FSDP, DeepSpeed)."""
    recipe = make_recipe(tmp_path / "r")
    train_model = build(recipe, torch.device("cpu"))
    with torch.no_grad():
        for param in train_model.model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    live = save_checkpoint(tmp_path / "live", recipe.base_model, train_model.block,
                           train_model.model)
    whole = {k: v.clone() for k, v in train_model.model.state_dict().items()}
    gathered = save_checkpoint(tmp_path / "gathered", recipe.base_model, train_model.block,
                               train_model.model, state_dict=whole)
    a, b = load_checkpoint(live), load_checkpoint(gathered)
    assert a.state_dict.keys() == b.state_dict.keys()
    for key in a.state_dict:
        assert torch.equal(a.state_dict[key], b.state_dict[key]), key
    assert (live / "adapter_model.safetensors").read_bytes() == (
        gathered / "adapter_model.safetensors").read_bytes()


def test_tensorboard_and_held_out_loss(make_recipe, tmp_path, chat_file):
    recipe = make_recipe(tmp_path / "tracked", max_steps=4)
    recipe.data.eval_file, recipe.schedule.eval_steps = str(chat_file), 2
    recipe.tracking.report_to = "tensorboard"
    result = run(recipe, progress=False)
    out = result.output_dir
    events = list((out / "runs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    evals = [json.loads(x) for x in (out / "eval_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4]
    assert result.manifest["results"]["final_eval_loss"] == evals[-1]["eval_loss"]
    # the held-out loss at the end is the trained model's: recompute it per batch
    train_model = result.train_model
    examples, _ = tokenize_dataset(train_model.tokenizer, read_jsonl(chat_file), 64)
    recipe.schedule.eval_steps = None
    trainer, _ = _trainer(recipe, examples, train_model)
    losses = []
    with torch.no_grad():
        for start in range(0, len(examples), 4):
            batch = trainer.data_collator(examples[start:start + 4])
            losses.append(float(train_model.model(**batch).loss) * len(batch["input_ids"]))
    assert evals[-1]["eval_loss"] == pytest.approx(sum(losses) / len(examples), rel=1e-5)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["grad_norm"] > 0 and r["tokens"] > 0 and r["lr"] >= 0 for r in log)


def test_wandb_runs_offline_into_the_output_dir(make_recipe, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    recipe = make_recipe(tmp_path / "wandb", max_steps=2, talan=None)
    recipe.tracking.report_to = "wandb"
    run(recipe, progress=False)
    runs = list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_the_cli_refuses_before_writing_anything(make_recipe, tmp_path, capsys):
    from training.cli import main

    recipe = make_recipe(tmp_path / "fsdp-out")
    recipe.distributed.engine = "fsdp"
    path = tmp_path / "fsdp.yaml"
    path.write_text(recipe.to_yaml())
    assert main([str(path), "--no-progress"]) == 2
    assert "talan-train: distributed.engine fsdp needs CUDA devices" in capsys.readouterr().err
    assert not (tmp_path / "fsdp-out").exists()
