"""``talan-train`` end to end from YAML, and the matched-pair audit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from talan_serve.checkpoint import load_checkpoint
from training.audit import audit
from training.cli import main


@pytest.fixture(scope="module")
def pair(make_recipe, tmp_path_factory):
    """Two YAML recipes (LoRA-only, TALAN) trained through the CLI, plus an unmatched one."""
    root = tmp_path_factory.mktemp("cli")
    runs = {}
    for name, talan, lr in (("lora", None, 5e-3), ("talan", "default", 5e-3),
                            ("lora-lr", None, 1e-3)):
        recipe = make_recipe(root / name, max_steps=2) if talan else make_recipe(
            root / name, talan=None, max_steps=2)
        recipe.name, recipe.optim.lr = name, lr
        path = root / f"{name}.yaml"
        path.write_text(recipe.to_yaml())
        assert main([str(path), "--no-progress"]) == 0
        runs[name] = root / name
    return runs


def test_lora_twin_has_no_talan_files(pair):
    lora = load_checkpoint(pair["lora"])
    assert not lora.has_talan and lora.adapter_dir == pair["lora"]
    assert not (pair["lora"] / "talan_model.safetensors").exists()
    talan = load_checkpoint(pair["talan"])
    assert talan.has_talan and talan.adapter_dir == pair["talan"]


def test_manifest_records_the_run(pair):
    manifest = json.loads((pair["talan"] / "run_manifest.json").read_text())
    training = manifest["training"]
    assert len(training["data"]["sha256"]) == 64
    assert training["recipe"]["seed"] == 7 and training["recipe"]["data_seed"] == 11
    assert training["talan"]["config"]["hidden_size"] == 128
    assert training["talan"]["parameters"]["talan_trainable"] > 0
    assert manifest["environment"]["packages"]["torch"].startswith("2.")
    assert "commit" in manifest["environment"]["git"]
    assert yaml.safe_load((pair["talan"] / "recipe.yaml").read_text())["name"] == "talan"
    log = [json.loads(x) for x in (pair["talan"] / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["tokens_per_second"] > 0 for r in log)


def test_audit_of_a_matched_pair_reports_only_talan(pair, capsys):
    differences, _ = audit(str(pair["lora"]), str(pair["talan"]))
    assert differences
    assert {d.kind for d in differences} == {"talan"}
    assert all(".talan" in d.key for d in differences)
    assert main(["audit", str(pair["lora"]), str(pair["talan"])]) == 0
    out = capsys.readouterr().out
    assert "MATCHED: the only training-side difference is the TALAN module" in out


def test_audit_flags_any_other_difference(pair, capsys):
    assert main(["audit", str(pair["lora"]), str(pair["lora-lr"])]) == 1
    out = capsys.readouterr().out
    assert "training.recipe.optim.lr: 0.005 -> 0.001" in out
    assert "NOT MATCHED: 1 training-side difference(s)" in out


def test_help_names_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "talan-train audit RUN_A RUN_B" in out and "talan-train make-data" in out


def test_bad_recipe_exits_2(tmp_path: Path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nbase_model: m\noutput_dir: o\ndata: {train_file: t}\nlr: 1\n")
    assert main([str(path)]) == 2
    assert "unknown field(s) lr" in capsys.readouterr().err


def test_eval_heldout_scores_every_run_on_the_same_problems(pair, tmp_path):
    from training import arithmetic, eval_heldout

    held = arithmetic.write_splits(tmp_path / "train.jsonl", 4, 3, seed=0)
    out = tmp_path / "eval.json"
    runs = [str(pair["lora"]), str(pair["talan"])]
    args = ["--heldout", str(held), "--n", "3", "--max-new-tokens", "6"]
    assert eval_heldout.main([*runs, *args, "--batch-size", "3", "--out", str(out)]) == 0
    batched = json.loads(out.read_text())
    assert batched["n"] == 3 and set(batched["runs"]) == {"lora", "talan"}
    for result in batched["runs"].values():
        assert [i["answer"] for i in result["items"]] == [
            json.loads(x)["answer"] for x in held.read_text().splitlines()]
        assert 0 <= result["correct"] <= 3
    assert batched["runs"]["lora"]["p1_perturbation_ratio"] is None
    assert 0 < batched["runs"]["talan"]["p1_perturbation_ratio"] < 1
    # left-padded batches decode exactly like one prompt at a time (TALAN ignores padding)
    assert eval_heldout.main([*runs, *args, "--batch-size", "1", "--out", str(out)]) == 0
    single = json.loads(out.read_text())
    for name in ("lora", "talan"):
        assert [i["output"] for i in single["runs"][name]["items"]] == [
            i["output"] for i in batched["runs"][name]["items"]]


def test_score_counts_extracted_answers():
    from training.eval_heldout import score

    problems = [{"answer": 4}, {"answer": 7}, {"answer": 9}]
    result = score(problems, ["The answer is 4.", "maybe 3", "9"])
    assert (result["correct"], result["n"]) == (2, 3)
    assert [i["predicted"] for i in result["items"]] == [4, 3, 9]
