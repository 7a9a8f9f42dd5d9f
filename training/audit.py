"""The apple-to-apple audit: every training-side difference between two runs.

Differences are sorted into three kinds:
- ``talan``: the treatment (the TALAN module and its axes); expected in a matched pair;
- ``training``: any other training-side input (data, adapter, optimizer, schedule,
  precision, seeds, base model): a red flag, the pair is not matched;
- ``environment``: software and hardware (package versions, git revision, device):
  reported as a warning, since the same recipe on other software is not the same run.
Names, output paths and results are not inputs and are not compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from training.manifest import read_manifest

_MISSING = "<absent>"
# Identify the run, not how it trains.
_NOT_COMPARED = ("recipe.name", "recipe.output_dir", "recipe.notes", "recipe.tracking.report_to")


@dataclass
class Difference:
    kind: str
    key: str
    a: Any
    b: Any


def flatten(record: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(record, dict):
        if not record and prefix:
            return {prefix: {}}
        flat: dict[str, Any] = {}
        for key, value in record.items():
            flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: record}


def _kind(key: str) -> str:
    if key.startswith("recipe.talan") or key.startswith("talan"):
        return "talan"
    return "training"


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[Difference]:
    differences = []
    for section, classify in (("training", _kind), ("environment", lambda _: "environment")):
        flat_a, flat_b = flatten(a.get(section, {})), flatten(b.get(section, {}))
        for key in sorted(set(flat_a) | set(flat_b)):
            if key in _NOT_COMPARED:
                continue
            va, vb = flat_a.get(key, _MISSING), flat_b.get(key, _MISSING)
            if va != vb:
                differences.append(Difference(classify(key), f"{section}.{key}", va, vb))
    return differences


def audit(run_a: str, run_b: str) -> tuple[list[Difference], str]:
    """Differences and a printable report; the pair is matched iff no ``training`` kind."""
    a, b = read_manifest(run_a), read_manifest(run_b)
    differences = compare(a, b)
    lines = [f"A: {run_a} ({a.get('name')})", f"B: {run_b} ({b.get('name')})", ""]
    for kind, title in (("talan", "TALAN module (the treatment)"),
                        ("training", "OTHER TRAINING-SIDE DIFFERENCES (red flags)"),
                        ("environment", "environment (software/hardware)")):
        found = [d for d in differences if d.kind == kind]
        lines.append(f"{title}: {len(found)}")
        lines += [f"  {d.key}: {d.a!r} -> {d.b!r}" for d in found]
    red = sum(d.kind == "training" for d in differences)
    talan = sum(d.kind == "talan" for d in differences)
    lines.append("")
    if red:
        lines.append(f"NOT MATCHED: {red} training-side difference(s) besides the TALAN module")
    elif talan:
        lines.append("MATCHED: the only training-side difference is the TALAN module")
    else:
        lines.append("IDENTICAL training side (no TALAN difference either)")
    return differences, "\n".join(lines)
