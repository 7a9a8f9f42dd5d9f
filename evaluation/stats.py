"""Paired statistics for TALAN+LoRA vs its baseline, from per-item correctness.

A *cell* is one (backbone, benchmark) pair with the same items scored on both sides. Per
cell: the accuracy delta, McNemar on the discordant items, and a paired bootstrap; across
cells: the non-regression count and the sign test. The McNemar statistic is reported three
ways, each named: the chi-square without and with continuity correction, and the exact
binomial test on the discordant pairs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass


def binomial_tail(successes: int, trials: int) -> float:
    """P[X >= successes] for X ~ Binomial(trials, 1/2)."""
    return sum(math.comb(trials, k) for k in range(successes, trials + 1)) / 2**trials


def chi2_1df_sf(statistic: float) -> float:
    """Survival function of the chi-square distribution with one degree of freedom."""
    return math.erfc(math.sqrt(statistic / 2))


def sign_test(deltas: Sequence[float]) -> dict:
    """One-sided sign test that TALAN does not regress: successes are cells with
    delta >= 0 (the non-regression count), p = P[X >= successes] under a fair coin."""
    non_negative = sum(d >= 0 for d in deltas)
    return {"cells": len(deltas), "non_regression": non_negative,
            "p_one_sided": binomial_tail(non_negative, len(deltas))}


@dataclass
class McNemar:
    b: int  # items only TALAN+LoRA gets right
    c: int  # items only the baseline gets right
    chi2: float  # (b - c)^2 / (b + c)
    chi2_corrected: float  # (|b - c| - 1)^2 / (b + c), Edwards' continuity correction
    p_chi2_two_sided: float
    p_chi2_corrected_two_sided: float
    p_chi2_one_sided: float  # half the two-sided p, in the direction b > c
    p_exact_one_sided: float  # P[X >= b], X ~ Binomial(b + c, 1/2)
    p_exact_two_sided: float


def mcnemar(b: int, c: int) -> McNemar:
    n = b + c
    if n == 0:
        return McNemar(b, c, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    chi2 = (b - c) ** 2 / n
    corrected = max(abs(b - c) - 1, 0) ** 2 / n
    p_two = chi2_1df_sf(chi2)
    exact_one = binomial_tail(b, n)
    exact_two = min(1.0, 2 * min(exact_one, binomial_tail(c, n)))
    return McNemar(b, c, chi2, corrected, p_two, chi2_1df_sf(corrected),
                   p_two / 2 if b > c else 1 - p_two / 2, exact_one, exact_two)


def bootstrap(talan: Sequence[bool], base: Sequence[bool], samples: int = 10_000,
              seed: int = 0) -> dict:
    """Paired bootstrap over items of the accuracy delta: a 95% percentile interval and
    Pr[delta > 0]. Seeded: the same inputs give the same numbers."""
    if len(talan) != len(base) or not talan:
        raise ValueError("the two sides must score the same, non-empty list of items")
    rng = random.Random(seed)
    diffs = [int(a) - int(b) for a, b in zip(talan, base, strict=True)]
    n = len(diffs)
    deltas = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n
                    for _ in range(samples))
    return {"samples": samples, "seed": seed,
            "ci95": (deltas[int(0.025 * samples)], deltas[int(0.975 * samples) - 1]),
            "p_delta_positive": sum(d > 0 for d in deltas) / samples}


@dataclass
class CellResult:
    cell: str
    items: int
    acc_talan: float
    acc_base: float
    delta: float
    mcnemar: McNemar
    ci95: tuple[float, float]
    p_delta_positive: float

    def to_dict(self) -> dict:
        return asdict(self)


def compare_cell(cell: str, talan: Sequence[bool], base: Sequence[bool],
                 samples: int = 10_000, seed: int = 0) -> CellResult:
    """Everything Appendix F reports for one cell."""
    b = sum(t and not s for t, s in zip(talan, base, strict=True))
    c = sum(s and not t for t, s in zip(talan, base, strict=True))
    boot = bootstrap(talan, base, samples, seed)
    acc_t, acc_b = sum(talan) / len(talan), sum(base) / len(base)
    return CellResult(cell, len(talan), acc_t, acc_b, acc_t - acc_b, mcnemar(b, c),
                      boot["ci95"], boot["p_delta_positive"])
