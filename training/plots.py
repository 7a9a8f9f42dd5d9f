"""Loss-curve PNGs from the JSONL step log."""

from __future__ import annotations

import json
from pathlib import Path


def read_log(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss(runs: dict[str, str | Path], out: str | Path, title: str = "training loss",
              eval_logs: dict[str, str | Path] | None = None) -> Path:
    """One PNG with each run's loss per optimizer step (``runs``: label -> log path), and
    its held-out loss where ``eval_logs`` has one (markers, same colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, log in runs.items():
        records = read_log(log)
        line, = ax.plot([r["step"] for r in records], [r["loss"] for r in records],
                        label=label)
        held = (eval_logs or {}).get(label)
        if held is not None and Path(held).is_file():
            evals = read_log(held)
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o--",
                    color=line.get_color(), label=f"{label} (held-out)")
        frozen = [r["step"] for r in records if "talan_active" in r and not r["talan_active"]]
        if frozen and any(r.get("talan_active") for r in records):
            ax.axvspan(min(frozen) - 0.5, max(frozen) + 0.5, alpha=0.1, color="grey")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
