"""bench/_report.py's statistics: the confidence interval every paired ratio in
docs/benchmarks.md is reported with."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import median_ci, paired_ratio  # noqa: E402


@pytest.mark.parametrize("n, lo, hi", [(6, 1, 6), (9, 2, 8), (15, 4, 12), (31, 10, 22), (60, 22, 39)])
def test_median_ci_order_statistics(n, lo, hi):
    # Published order-statistic intervals for the median at >= 95 % (1-based ranks), e.g.
    # n = 15: [x_(4), x_(12)] covers with 96.5 %, [x_(5), x_(11)] only 88.2 %.
    med, a, b = median_ci([float(v) for v in range(n, 0, -1)])  # unsorted input
    assert (a, b) == (lo, hi)
    assert med == (n + 1) / 2


@pytest.mark.parametrize("n", [1, 2, 5])
def test_median_ci_too_few_values_is_min_max(n):
    v = [3.0, 1.0, 2.0, 5.0, 4.0][:n]
    assert median_ci(v)[1:] == (min(v), max(v))


def test_median_ci_empty_raises():
    with pytest.raises(ValueError, match="at least one"):
        median_ci([])


def test_median_ci_covers_the_median_at_the_stated_level():
    # Skewed data (exponential, median ln 2): the interval is distribution-free.
    rng = random.Random(0)
    for n in (9, 15, 31):
        hits = sum(lo <= 0.6931471805599453 <= hi
                   for _, lo, hi in (median_ci([rng.expovariate(1.0) for _ in range(n)]) for _ in range(3000)))
        assert 0.94 <= hits / 3000 <= 0.995, (n, hits)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.01, 100.0, allow_nan=False), min_size=1, max_size=80))
def test_median_ci_brackets_the_sample_median(v):
    med, lo, hi = median_ci(v)
    assert min(v) <= lo <= med <= hi <= max(v)
    assert lo in v and hi in v


def test_paired_ratio_format():
    base = [2.0] * 15
    other = [2.0 / r for r in (0.5, 0.6, 0.7, 0.75, 0.8, 0.81, 0.82, 0.83, 0.84, 0.85, 0.86, 0.9, 1.0, 1.1, 1.2)]
    assert paired_ratio(base, other) == "0.83x [0.75-0.90] (0.50-1.20)"
