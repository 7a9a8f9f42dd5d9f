"""Paired statistics against SciPy on fixed inputs, and the paper's Table 11 rows."""

from __future__ import annotations

import pytest
from scipy import stats as scipy_stats

from evaluation.stats import bootstrap, compare_cell, mcnemar, sign_test


def test_sign_test_on_cells_and_backbones():
    assert sign_test([0.02] * 12 + [0.0] * 4)["p_one_sided"] == 2**-16  # 16 of 16 >= 0
    assert sign_test([0.01, 0.03, 0.0, 0.02])["p_one_sided"] == 2**-4  # 4 of 4 backbones
    result = sign_test([0.1, -0.2, 0.3, 0.0, -0.1, 0.2])
    assert result["non_regression"] == 4
    assert result["p_one_sided"] == pytest.approx(
        scipy_stats.binomtest(4, 6, 0.5, alternative="greater").pvalue, rel=1e-12)


def test_mcnemar_reports_each_variant_by_name():
    m = mcnemar(28, 11)
    assert round(m.chi2, 2) == 7.41  # uncorrected, as Table 11 prints it
    assert round(m.chi2_corrected, 2) == 6.56
    assert round(m.p_chi2_corrected_two_sided, 4) == 0.0104  # Table 11's p = 0.011
    assert round(m.p_exact_one_sided, 4) == 0.0047
    assert m.p_chi2_two_sided == pytest.approx(scipy_stats.chi2.sf(m.chi2, 1), rel=1e-10)
    assert m.p_chi2_corrected_two_sided == pytest.approx(
        scipy_stats.chi2.sf(m.chi2_corrected, 1), rel=1e-10)
    assert m.p_exact_one_sided == pytest.approx(
        scipy_stats.binomtest(28, 39, 0.5, alternative="greater").pvalue, rel=1e-12)
    assert m.p_exact_two_sided == pytest.approx(scipy_stats.binomtest(28, 39, 0.5).pvalue,
                                                rel=1e-12)
    # Table 11's 17 vs 15 row: p = 0.36 is the uncorrected one-sided test.
    assert round(mcnemar(17, 15).p_chi2_one_sided, 2) == 0.36


def test_bootstrap_is_seeded_and_brackets_the_delta():
    talan = [True] * 30 + [False] * 10
    base = [True] * 20 + [False] * 20
    first, again = bootstrap(talan, base, seed=3), bootstrap(talan, base, seed=3)
    assert first == again
    assert bootstrap(talan, base, seed=4) != first
    low, high = first["ci95"]
    assert low < 0.25 < high and low > 0  # delta 10/40, always positive here
    assert first["p_delta_positive"] == 1.0
    cell = compare_cell("demo", talan, base)
    assert (cell.delta, cell.mcnemar.b, cell.mcnemar.c) == (0.25, 10, 0)
    with pytest.raises(ValueError, match="same, non-empty"):
        bootstrap([True], [True, False])
