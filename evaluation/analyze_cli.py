"""talan-analyze: what a TALAN checkpoint does inside its host, from a prompt file.

    talan-analyze --checkpoint smollm2-talan-demo --twin smollm2-lora-demo \\
        --prompts data/arith/heldout.jsonl --limit 40 --out runs/analysis

Writes ``analysis.json`` and ``analysis.md``, and ``divergence.png``: per residual-stream
point, the relative-L2 divergence and token cosine between TALAN's hooks on and off (and
between TALAN+LoRA and the LoRA-only twin, with ``--twin``), one dot per prompt; the
scale and per-token cosine of TALAN's update against LoRA's at the insertion point; the
drift audit of the TALAN tensors against a fresh init (seed 0).

The prompt file: JSON lines with ``messages`` (rendered with the chat template, without
an assistant turn), ``text`` or ``prompt``; or plain text, one prompt per line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

logger = logging.getLogger("talan-analyze")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="talan-analyze", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a TALAN+LoRA checkpoint: registry "
                   "name or directory")
    p.add_argument("--twin", default=None, help="its LoRA-only twin (name or directory)")
    p.add_argument("--prompts", required=True)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", required=True)
    return p


def read_prompts(path: Path, tokenizer: Any, limit: int | None) -> list[list[int]]:
    prompts = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = line
        if isinstance(record, dict) and "messages" in record:
            turns = [m for m in record["messages"] if m["role"] != "assistant"]
            text = tokenizer.apply_chat_template(turns, tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False).input_ids
        elif isinstance(record, dict):
            ids = tokenizer(record.get("text", record.get("prompt"))).input_ids
        else:
            ids = tokenizer(str(record)).input_ids
        prompts.append(ids)
        if limit is not None and len(prompts) == limit:
            break
    if not prompts:
        raise SystemExit(f"talan-analyze: no prompts in {path}")
    return prompts


def plot_divergence(results: list[dict[str, Any]], insertion: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(10, 3.2 * len(results)), squeeze=False)
    for row, result in enumerate(results):
        points = result["points"]
        xs = range(len(points))
        for col, (key, name) in enumerate((("rel_diff", "relative L2 divergence"),
                                           ("cosine", "token cosine"))):
            ax = axes[row][col]
            for values in result[key]:
                ax.plot(xs, values, ".", color="tab:blue", alpha=0.3, markersize=4)
            ax.plot(xs, result[f"{key}_mean"], "-", color="tab:red", label="mean")
            ax.axvline(points.index(insertion), color="grey", linestyle="--",
                       label=f"TALAN at {insertion}")
            step = max(1, len(points) // 12)
            ax.set_xticks(list(xs)[::step], points[::step])
            ax.set_title(f"{result['label']}: {name}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(report: dict[str, Any]) -> str:
    scale, audit = report["scale"], report["drift_audit"]
    lines = [f"# talan-analyze: {report['checkpoint']}", "",
             f"{report['prompts']} prompts; TALAN at `{report['insertion_point']}`.", "",
             "## Divergence per residual-stream point (mean over prompts)", "",
             "| comparison | " + " | ".join(report["divergence"][0]["points"]) + " |",
             "|---|" + "---|" * len(report["divergence"][0]["points"])]
    for result in report["divergence"]:
        lines.append(f"| {result['label']}: rel. L2 | "
                     + " | ".join(f"{v:.2e}" for v in result["rel_diff_mean"]) + " |")
        lines.append(f"| {result['label']}: cosine | "
                     + " | ".join(f"{v:.4f}" for v in result["cosine_mean"]) + " |")
    lines += ["", "![divergence](divergence.png)", ""]
    if scale is not None:
        lines += ["## Scale and orthogonality at the insertion point", "",
                  "| ‖ΔLoRA‖ / ‖ΔTALAN‖ | cosine (mean over tokens) | std | tokens |",
                  "|---|---|---|---|",
                  f"| {scale['norm_ratio_lora_over_talan']:.1f} | {scale['cosine_mean']:+.4f} "
                  f"| {scale['cosine_std']:.4f} | {scale['tokens']} |", ""]
    fresh, drifted = audit["random_fresh_looking"], audit["movable_deterministic_drifted"]
    lines += ["## Drift audit (against a fresh init, seed 0)", "",
              f"Random tensors fresh-looking: {fresh[0]} / {fresh[1]}; movable deterministic "
              f"tensors drifted: {drifted[0]} / {drifted[1]}; verdict: **{audit['verdict']}**.",
              "", "| tensor | init | movable | rel_dist | fresh-looking / drifted |",
              "|---|---|---|---|---|"]
    for row in audit["tensors"]:
        flag = row.get("fresh_looking", row.get("drifted"))
        lines.append(f"| {row['tensor']} | {row['init']} | {row['movable']} | "
                     f"{row['rel_dist']:.4f} | {flag} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from evaluation.analyze import (
        divergences,
        drift_audit,
        insertion_point,
        scale_and_orthogonality,
    )
    from talan_serve.reference import find_talan, load_reference

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_reference(args.checkpoint)
    block = find_talan(model)
    if block is None:
        raise SystemExit(f"talan-analyze: {args.checkpoint} has no TALAN block")
    twin = load_reference(args.twin)[0] if args.twin else None
    prompts = read_prompts(Path(args.prompts), tokenizer, args.limit)
    logger.info("%d prompts, TALAN at %s", len(prompts), insertion_point(block.config))
    results = []
    for prompt in tqdm(prompts, desc="divergence", unit="prompt"):
        results.append(divergences(model, [prompt], twin))
    merged = results[0]
    for more in results[1:]:
        for target, extra in zip(merged, more, strict=True):
            target.rel_diff += extra.rel_diff
            target.cosine += extra.cosine
    scale = (scale_and_orthogonality(model, prompts) if hasattr(model, "disable_adapter")
             else None)
    saved = {k: v.detach().cpu() for k, v in block.state_dict().items()}
    report = {"checkpoint": args.checkpoint, "twin": args.twin, "prompts": len(prompts),
              "insertion_point": insertion_point(block.config),
              "divergence": [d.summary() for d in merged], "scale": scale,
              "drift_audit": drift_audit(block.config, saved)}
    (out / "analysis.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_divergence(report["divergence"], report["insertion_point"], out / "divergence.png")
    text = render(report)
    (out / "analysis.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
