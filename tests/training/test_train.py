"""Short real runs on a tiny random Qwen3: loss, checkpoint parity, matched init, axes."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from talan_serve.reference import find_talan, load_reference, talan_disabled
from talan_serve.trainable import parameter_groups
from training.model import lora_state, talan_state
from training.run import run
from training.step_log import Hooks


@dataclass
class Trace:
    """What hooks saw during a run, per optimizer step."""

    lora_before: dict[int, dict] = field(default_factory=dict)
    talan_after: dict[int, dict] = field(default_factory=dict)
    probe_logits: dict[int, torch.Tensor] = field(default_factory=dict)
    grads: dict[int, dict] = field(default_factory=dict)


def probe_batch(tokenizer) -> dict[str, torch.Tensor]:
    encoded = tokenizer(["one two three", "red"], padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def traced_run(recipe, probe: bool = False):
    trace = Trace()

    def before_step(step, tm):
        trace.lora_before[step] = lora_state(tm.model)
        if probe:
            tm.model.eval()
            with torch.no_grad():
                trace.probe_logits[step] = tm.model(**probe_batch(tm.tokenizer)).logits
            tm.model.train()

    def before_update(step, tm):
        trace.grads[step] = {n: p.grad.detach().clone() for n, p in tm.model.named_parameters()
                             if p.grad is not None}

    def after_step(step, tm):
        trace.talan_after[step] = talan_state(tm.block)

    hooks = Hooks(before_step=[before_step], before_update=[before_update],
                  after_step=[after_step])
    return run(recipe, hooks=hooks, progress=False), trace


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loss_goes_down_and_checkpoint_matches_reference(tiny_qwen3, make_recipe, tmp_path):
    recipe = make_recipe(tmp_path / "run", max_steps=12)
    result = run(recipe, progress=False)
    losses = [r.loss for r in result.records]
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    out = result.output_dir
    for name in ("talan_config.json", "talan_model.safetensors", "adapter_model.safetensors",
                 "talan_manifest.json", "run_manifest.json", "train_log.jsonl", "loss.png"):
        assert (out / name).is_file(), name
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 12

    trained = result.train_model.model
    batch = probe_batch(result.train_model.tokenizer)
    with torch.no_grad():
        expected = trained(**batch).logits
        reloaded, _ = load_reference(tiny_qwen3, talan=out)
        got = reloaded(**batch).logits
        assert find_talan(reloaded) is not None
        # TALAN matters in the reloaded model, so the parity is not vacuous.
        with talan_disabled(reloaded):
            assert not torch.allclose(reloaded(**batch).logits, got, atol=1e-4)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(got[mask], expected[mask], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def freeze_pair(make_recipe, tiny_talan, tmp_path_factory):
    """A baseline and a TALAN run with freeze_steps=3, traced with a probe batch."""
    root = tmp_path_factory.mktemp("pair")
    base = traced_run(make_recipe(root / "lora", talan=None), probe=True)
    talan = {**tiny_talan, "freeze_steps": 3}
    treated = traced_run(make_recipe(root / "talan", talan=talan),
                         probe=True)
    return base, treated


def test_matched_init_lora_identical_at_step_0(freeze_pair):
    (_, base), (_, treated) = freeze_pair
    before = base.lora_before[1]
    assert before and _same(before, treated.lora_before[1])
    # lora_A is a real random draw (not zeros), so equality is not trivial
    assert any(("lora_A" in k and v.abs().sum() > 0) for k, v in before.items())


def test_freeze_steps_output_equals_baseline_then_departs(freeze_pair):
    (base_run, base), (talan_run, treated) = freeze_pair
    base_losses = [r.loss for r in base_run.records]
    talan_losses = [r.loss for r in talan_run.records]
    assert talan_losses[:3] == base_losses[:3]
    for step in (1, 2, 3):
        assert torch.equal(treated.probe_logits[step], base.probe_logits[step]), step
    assert [r.talan_active for r in talan_run.records] == [False] * 3 + [True] * 3
    # step 4: same LoRA weights as the baseline, but TALAN now acts
    assert _same(treated.lora_before[4], base.lora_before[4])
    assert not torch.equal(treated.probe_logits[4], base.probe_logits[4])
    assert talan_losses[3] != base_losses[3]
    # TALAN got no update while it was the identity
    assert _same(treated.talan_after[3], treated.talan_after[1])


def test_frozen_scope_changes_no_talan_tensor(tiny_qwen3, make_recipe, tiny_talan, tmp_path):
    recipe = make_recipe(tmp_path / "frozen", max_steps=4,
                         talan={**tiny_talan, "trainable": "frozen"})
    result, trace = traced_run(recipe)
    initial = talan_state(find_talan(load_reference(tiny_qwen3, talan=result.output_dir)[0]))
    for step in range(1, 5):
        assert _same(trace.talan_after[step], trace.talan_after[1])
    assert _same(initial, trace.talan_after[1])
    assert not _same(trace.lora_before[1], lora_state(result.train_model.model))
    assert not any("talan" in name for step in trace.grads for name in trace.grads[step])


def test_activate_steps_trains_talan_up_to_k_only(make_recipe, tiny_talan, tmp_path):
    recipe = make_recipe(tmp_path / "act", max_steps=6,
                         talan={**tiny_talan, "activate_steps": 3})
    recipe.optim.warmup_ratio = 0.0  # HF-style warmup makes step 1's LR zero
    result, trace = traced_run(recipe)
    states = trace.talan_after
    changed = [not _same(states[s], states[s - 1]) for s in range(2, 7)]
    assert changed == [True, True, False, False, False]
    # ... and step 1 moved it away from the init (read back from step 1's grads)
    assert any("talan" in name for name in trace.grads[1])
    assert not any("talan" in name for name in trace.grads[4])
    assert [r.talan_training for r in result.records] == [True] * 3 + [False] * 3
    # the LoRA keeps training after TALAN stops
    assert not _same(trace.lora_before[5], trace.lora_before[6])


def test_grad_scale_multiplies_exactly_the_body_grads(make_recipe, tiny_talan, tmp_path):
    grads = {}
    for gamma in (1.0, 8.0):
        recipe = make_recipe(tmp_path / f"g{gamma}", max_steps=1,
                             talan={**tiny_talan, "grad_scale": gamma})
        result, trace = traced_run(recipe)
        grads[gamma] = trace.grads[1]
        groups = parameter_groups(result.train_model.block)
    names = {id(p): n for n, p in result.train_model.model.named_parameters()}
    body = {names[id(p)] for p in groups["body"]}
    gate = {names[id(p)] for p in groups["gate"]}
    assert grads[1.0].keys() == grads[8.0].keys() and body | gate <= grads[1.0].keys()
    for name, g1 in grads[1.0].items():
        g8 = grads[8.0][name]
        if name in body:
            assert g1.abs().sum() > 0, name
            torch.testing.assert_close(g8, 8.0 * g1, rtol=1e-6, atol=0)
        else:  # gate/alpha and every LoRA tensor: untouched
            assert torch.equal(g8, g1), name
    assert any("lora_" in n for n in grads[1.0]) and gate


@pytest.mark.parametrize("point", ["layer_1", "embedding"])
def test_gradient_checkpointing_gives_the_same_grads(make_recipe, tiny_talan, tmp_path, point):
    grads = {}
    for checkpointing in (False, True):
        recipe = make_recipe(tmp_path / f"gc{checkpointing}",
                             max_steps=1, gradient_checkpointing=checkpointing,
                             talan={**tiny_talan, "connection_point": point})
        recipe.adapter.dropout = 0.0  # dropout masks are redrawn by the replay
        grads[checkpointing] = traced_run(recipe)[1].grads[1]
    assert grads[True].keys() == grads[False].keys()
    assert any("talan" in name for name in grads[True])
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("adapter", ["dora", "rslora"])
def test_adapter_variants_train_and_reload(tiny_qwen3, make_recipe, tmp_path, adapter):
    recipe = make_recipe(tmp_path / adapter, max_steps=2)
    recipe.adapter.type = adapter
    result = run(recipe, progress=False)
    saved = result.manifest["training"]["adapter"]
    assert (saved["use_dora"], saved["use_rslora"]) == (adapter == "dora", adapter == "rslora")
    batch = probe_batch(result.train_model.tokenizer)
    with torch.no_grad():
        expected = result.train_model.model(**batch).logits
        got = load_reference(tiny_qwen3, talan=result.output_dir)[0](**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(got[mask], expected[mask], rtol=0, atol=1e-5)
