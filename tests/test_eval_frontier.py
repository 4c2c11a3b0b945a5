"""Matched-entropy interpolation and gap closed, on hand-built points; metrics against brute force."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from mcd_scale.eval.frontier import FrontierPoint, gap_closed, interpolate_quality_at_entropy
from mcd_scale.eval.metrics import (SamplingCost, gen_ppl, mean_unigram_entropy, per_sample_unigram_entropy,
                                    speedup, unigram_entropy)


def test_interpolation_is_piecewise_linear_in_any_input_order():
    pts = [(3.0, 30.0), (1.0, 10.0), (2.0, 40.0)]
    # tolerance (this block): float64 linear interpolation / ratios of a few exact inputs; approx default rel 1e-6
    assert interpolate_quality_at_entropy(pts, 1.5).quality == pytest.approx(25.0)
    assert interpolate_quality_at_entropy(pts, 2.75).quality == pytest.approx(32.5)
    assert interpolate_quality_at_entropy(pts, 3.0).quality == pytest.approx(30.0)
    one = interpolate_quality_at_entropy([FrontierPoint(2.0, 7.0, 1.0)], 2.0)
    assert one.in_range and one.quality == 7.0


def test_out_of_range_is_flagged_not_extrapolated():
    res = interpolate_quality_at_entropy([(1.0, 10.0), (2.0, 20.0)], 2.5)
    assert not res.in_range and math.isnan(res.quality)
    assert (res.entropy_min, res.entropy_max) == (1.0, 2.0)
    with pytest.raises(ValueError):
        interpolate_quality_at_entropy([], 1.0)


def test_gap_closed_credits_quality_at_equal_entropy_only():
    many = [(4.0, 10.0), (5.0, 20.0)]
    few = [(4.0, 30.0), (5.0, 60.0)]
    # At entropy 4.5: many = 15, few = 45; a student at 25 closes (45 - 25) / 30 = 2/3.
    assert gap_closed(many, few, (4.5, 25.0)).fraction == pytest.approx(2 / 3)
    # A colder student whose quality equals the few-step teacher's at its entropy closes nothing.
    assert gap_closed(many, few, (4.0, 30.0)).fraction == pytest.approx(0.0)
    out = gap_closed(many, few, (3.0, 5.0))
    assert math.isnan(out.fraction) and "not 3" in out.note
    assert "no gap" in gap_closed(few, many, (4.5, 25.0)).note


def test_unigram_entropy_and_gen_ppl_against_brute_force():
    rng = random.Random(0)
    samples = [[rng.randrange(7) for _ in range(rng.randrange(1, 40))] for _ in range(20)]
    for s in samples:
        brute = -sum((s.count(v) / len(s)) * math.log(s.count(v) / len(s)) for v in set(s))
        # tolerance: float64 entropy of <= 8 counts, two summation orders: ~1e-16 * n
        assert unigram_entropy(s) == pytest.approx(brute, abs=1e-12)
    assert mean_unigram_entropy(samples) == pytest.approx(np.mean(per_sample_unigram_entropy(samples)))
    assert unigram_entropy([5] * 9) == 0.0
    assert unigram_entropy(list(range(8))) == pytest.approx(math.log(8))
    nll, n = [1.0, 3.0], [30, 10]
    # tolerance: float64 exp of a weighted mean of exact numbers: approx default
    assert gen_ppl(nll, n) == pytest.approx(math.exp((30 * 1.0 + 10 * 3.0) / 40))
    with pytest.raises(ValueError):
        gen_ppl([1.0], [0])


def test_sampling_cost_and_speedup():
    c = SamplingCost(num_samples=8, seconds=4.0, nfe_total=128)
    assert (c.seconds_per_sample, c.nfe_per_sample) == (0.5, 16.0)
    assert speedup(256.0, 16.0) == 16.0 and math.isnan(speedup(None, 1.0)) and math.isnan(speedup(1.0, 0.0))
    with pytest.raises(ValueError):
        SamplingCost(num_samples=0, seconds=1.0, nfe_total=1)
