"""talan-analyze on tiny random-weight Qwen3 checkpoints."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    lines = [{"text": "the water call first who people"}, {"text": "solve the sum total"},
             {"messages": [{"role": "user", "content": "apples number sound"}]}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + "plain text line\n")
    return path


@pytest.mark.parametrize(("connection_point", "first"), [("layer_2", 3), ("embedding", 0)])
def test_divergence_starts_at_the_insertion_point(tiny_model, tmp_path, prompt_file,
                                                  connection_point, first):
    from evaluation.analyze_cli import main
    from talan_serve.checkpoint import save_checkpoint
    from talan_serve.reference import load_reference
    from talan_serve.testing import build_tiny_checkpoint

    host = tiny_model("qwen3")
    checkpoint = build_tiny_checkpoint(host, tmp_path / "ck", seed=1,
                                       connection_point=connection_point)
    twin = save_checkpoint(tmp_path / "twin", str(host),
                           peft_model=load_reference(host, talan=checkpoint)[0])
    out = tmp_path / "out"
    assert main(["--checkpoint", str(checkpoint), "--twin", str(twin), "--prompts",
                 str(prompt_file), "--out", str(out)]) == 0
    report = json.loads((out / "analysis.json").read_text())
    hooks, vs_twin = report["divergence"]
    assert hooks["points"] == ["emb", "L0", "L1", "L2", "L3"]
    for per_prompt in hooks["rel_diff"]:
        assert len(per_prompt) == 5
        assert all(value == 0.0 for value in per_prompt[:first])  # before TALAN: identical
        assert all(value > 1e-6 for value in per_prompt[first:])
    # TALAN's own LoRA in both: the twin differs exactly where the hooks do.
    for twin_row, hooks_row in zip(vs_twin["rel_diff"], hooks["rel_diff"], strict=True):
        assert twin_row == pytest.approx(hooks_row, abs=1e-6)
    assert all(c < 1.0 for c in hooks["cosine_mean"][first:])
    scale = report["scale"]
    assert scale["point"] == hooks["points"][first] and scale["tokens"] > 0
    assert scale["lora_point"] == hooks["points"][max(first, 1)]  # where LoRA has acted
    assert scale["norm_ratio_lora_over_talan"] > 0 and -1 <= scale["cosine_mean"] <= 1
    assert (out / "divergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "verdict" in (out / "analysis.md").read_text()


def test_drift_audit_tells_trained_from_frozen(tiny_model, tmp_path):
    import torch

    from evaluation.analyze import drift_audit, fresh_block
    from talan_serve.checkpoint import load_checkpoint
    from talan_serve.testing import build_tiny_checkpoint

    # A seed-1 block with a randomized gate: its random tensors are a fresh draw, its
    # deterministic gate has moved.
    checkpoint = load_checkpoint(build_tiny_checkpoint(tiny_model("qwen3"), tmp_path / "ck",
                                                       seed=1))
    audit = drift_audit(checkpoint.config, checkpoint.state_dict)
    randoms = [r for r in audit["tensors"] if r["init"] == "random"]
    assert randoms and all(r["fresh_looking"] for r in randoms)
    assert all(abs(r["rel_dist"] - 2**0.5) < 0.15 for r in randoms)
    assert audit["verdict"] == "TRAINED" and audit["movable_deterministic_drifted"][0] >= 1
    # The seed-0 init itself: nothing moved, random tensors at distance 0.
    untouched = {k: v.clone() for k, v in fresh_block(checkpoint.config, 0).state_dict().items()}
    audit = drift_audit(checkpoint.config, untouched)
    assert audit["verdict"] == "FROZEN"
    assert all(r["rel_dist"] == 0.0 for r in audit["tensors"])
    assert audit["random_fresh_looking"][0] == 0
    assert torch.is_tensor(next(iter(untouched.values())))
