"""Paired statistics for TALAN+LoRA vs its baseline, from per-item correctness.

A *cell* is one (backbone, benchmark) pair with the same items scored on both sides. Per
cell: the accuracy delta, McNemar on the discordant items, and a paired bootstrap; across
cells: the non-regression count and the sign test. The McNemar statistic is reported three
ways, each named: the chi-square without and with continuity correction, and the exact
binomial test on the discordant pairs. The distributions are SciPy's (``scipy.stats``);
SciPy has no McNemar test of its own, so its statistic is written out here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


def binomial_tail(successes: int, trials: int) -> float:
    """P[X >= successes] for X ~ Binomial(trials, 1/2)."""
    return float(stats.binom.sf(successes - 1, trials, 0.5))


def chi2_1df_sf(statistic: float) -> float:
    """Survival function of the chi-square distribution with one degree of freedom."""
    return float(stats.chi2.sf(statistic, 1))


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
    exact_two = float(stats.binomtest(b, n, 0.5).pvalue)
    return McNemar(b, c, chi2, corrected, p_two, chi2_1df_sf(corrected),
                   p_two / 2 if b > c else 1 - p_two / 2, exact_one, exact_two)


def bootstrap(talan: Sequence[bool], base: Sequence[bool], samples: int = 10_000,
              seed: int = 0) -> dict:
    """Paired bootstrap over items of the accuracy delta: a 95% percentile interval and
    Pr[delta > 0] (``scipy.stats.bootstrap``). Seeded: the same inputs give the same
    numbers."""
    if len(talan) != len(base) or not talan:
        raise ValueError("the two sides must score the same, non-empty list of items")
    diffs = np.array([int(a) - int(b) for a, b in zip(talan, base, strict=True)], float)
    if np.all(diffs == diffs[0]):  # every resample is the same delta: no spread to estimate
        delta = float(diffs[0])
        return {"samples": samples, "seed": seed, "ci95": (delta, delta),
                "p_delta_positive": float(delta > 0)}
    result = stats.bootstrap((diffs,), np.mean, n_resamples=samples, method="percentile",
                             confidence_level=0.95, vectorized=True,
                             rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return {"samples": samples, "seed": seed, "ci95": (float(low), float(high)),
            "p_delta_positive": float(np.mean(result.bootstrap_distribution > 0))}


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
