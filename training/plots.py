"""Loss-curve PNGs from the JSONL step log."""

from __future__ import annotations

import json
from pathlib import Path


def read_log(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss(runs: dict[str, str | Path], out: str | Path, title: str = "training loss") -> Path:
    """One PNG with each run's loss per optimizer step (``runs``: label -> log path)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, log in runs.items():
        records = read_log(log)
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], label=label)
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
