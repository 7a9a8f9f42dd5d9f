"""Per-item results of an lm-eval run, and the paired comparison of two sides.

A side's run folder holds one ``<task>.jsonl`` per task (one line per item: ``doc_id``,
``score``, ``correct``) and ``summary.json`` (lm-eval's own aggregate per task next to
the per-item mean, which must agree). ``compare`` pairs two sides item by item.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluation.stats import CellResult, compare_cell, sign_test


@dataclass
class TaskItems:
    task: str
    metric: str  # "acc,none": lm-eval's metric and filter
    reported: float  # lm-eval's aggregate
    items: list[dict[str, Any]]

    @property
    def mean(self) -> float:
        return sum(i["score"] for i in self.items) / len(self.items)


def primary_metric(task_results: dict[str, Any]) -> str:
    """The task's first reported ``metric,filter`` (not a stderr, not the alias)."""
    for key, value in task_results.items():
        if "," in key and "_stderr" not in key and isinstance(value, int | float):
            return key
    raise ValueError(f"no metric in {sorted(task_results)}")


def items_of(results: dict[str, Any]) -> dict[str, TaskItems]:
    """Per-item scores from ``lm_eval.simple_evaluate(..., log_samples=True)``."""
    out = {}
    for task, samples in results["samples"].items():
        key = primary_metric(results["results"][task])
        metric, filter_name = key.split(",", 1)
        items = []
        for sample in sorted(samples, key=lambda s: s["doc_id"]):
            if sample.get("filter", "none") != filter_name:
                continue
            score = float(sample[metric])
            response = sample.get("filtered_resps") or sample.get("resps")
            items.append({"doc_id": sample["doc_id"], "score": score, "correct": score > 0.5,
                          "response": response[0] if isinstance(response, list) and
                          len(response) == 1 else response})
        out[task] = TaskItems(task, key, float(results["results"][task][key]), items)
    return out


def write_side(folder: Path, tasks: dict[str, TaskItems], meta: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"meta": meta, "tasks": {}}
    for name, task in tasks.items():
        with (folder / f"{name}.jsonl").open("w") as handle:
            for item in task.items:
                handle.write(json.dumps(item, default=str) + "\n")
        summary["tasks"][name] = {"metric": task.metric, "lm_eval": task.reported,
                                  "per_item_mean": task.mean, "items": len(task.items),
                                  "agrees": abs(task.mean - task.reported) < 1e-9}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def read_side(folder: Path) -> dict[str, list[dict[str, Any]]]:
    summary = json.loads((folder / "summary.json").read_text())
    return {name: [json.loads(line) for line in (folder / f"{name}.jsonl").read_text()
                   .splitlines()] for name in summary["tasks"]}


def compare(cells: dict[str, tuple[list[dict], list[dict]]], samples: int = 10_000,
            seed: int = 0) -> tuple[list[CellResult], dict[str, Any]]:
    """Each cell's paired statistics, and the sign test across cells."""
    results = []
    for cell, (talan, base) in cells.items():
        by_id = {item["doc_id"]: item["correct"] for item in base}
        if sorted(by_id) != sorted(item["doc_id"] for item in talan):
            raise ValueError(f"{cell}: the two sides scored different items")
        results.append(compare_cell(cell, [i["correct"] for i in talan],
                                    [by_id[i["doc_id"]] for i in talan], samples, seed))
    return results, sign_test([r.delta for r in results])


def render(results: list[CellResult], sign: dict[str, Any], labels: tuple[str, str]) -> str:
    talan, base = labels
    lines = [f"| cell | items | {talan} | {base} | delta | 95% CI (bootstrap) | "
             "Pr[delta>0] | b / c | McNemar chi2 (uncorr.) | chi2 (corr.) | p corr. 2-sided "
             "| p exact 1-sided |", "|---|" + "---|" * 11]
    for r in results:
        m = r.mcnemar
        lines.append(
            f"| {r.cell} | {r.items} | {r.acc_talan:.3f} | {r.acc_base:.3f} | "
            f"{r.delta:+.3f} | [{r.ci95[0]:+.3f}, {r.ci95[1]:+.3f}] | "
            f"{r.p_delta_positive:.3f} | {m.b} / {m.c} | {m.chi2:.2f} | {m.chi2_corrected:.2f} "
            f"| {m.p_chi2_corrected_two_sided:.4f} | {m.p_exact_one_sided:.4f} |")
    lines += ["", f"Non-regression: {sign['non_regression']} of {sign['cells']} cells "
              f"(delta >= 0); sign test, one-sided: p = {sign['p_one_sided']:.3g}.", "",
              "b: items only the first side gets right; c: only the second. chi2 (uncorr.) "
              "= (b-c)^2/(b+c); chi2 (corr.) = (|b-c|-1)^2/(b+c) with its two-sided p; "
              "p exact: P[X >= b], X ~ Bin(b+c, 1/2)."]
    return "\n".join(lines) + "\n"


def plot(results: list[CellResult], path: Path, labels: tuple[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(results) + 2), 3.2))
    xs = range(len(results))
    deltas = [r.delta for r in results]
    low = [r.delta - r.ci95[0] for r in results]
    high = [r.ci95[1] - r.delta for r in results]
    ax.errorbar(xs, deltas, yerr=[low, high], fmt="o", capsize=4)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(list(xs), [r.cell for r in results], rotation=20, ha="right")
    ax.set_ylabel(f"accuracy: {labels[0]} - {labels[1]}")
    ax.set_title("Per-cell delta with 95% bootstrap CI")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
