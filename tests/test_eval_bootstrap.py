"""Bootstrap intervals of the matched-entropy summary, on hand-built per-sample scores."""
from __future__ import annotations

import numpy as np
import pytest

from mcd_scale.eval.bootstrap import SampleScores, bootstrap_student
from mcd_scale.eval.report import summarize


def scores(entropy: float, nll: float, n: int = 40, spread: float = 0.0, seed: int = 0) -> SampleScores:
    rng = np.random.default_rng(seed)
    return SampleScores(nll + spread * rng.standard_normal(n), np.full(n, 100.0),
                        entropy + spread * rng.standard_normal(n))


def test_identical_samples_give_a_zero_width_interval_at_the_point_estimate():
    few = [scores(3.0, 2.0), scores(4.0, 3.0)]
    many = [scores(3.0, 1.0), scores(4.0, 2.0)]
    out = bootstrap_student(scores(3.5, 2.2), many, few, draws=200)
    # teacher@n at entropy 3.5 is 2.5, teacher@N 1.5: gain 0.3, gap closed 0.3 / 1.0
    # tolerance: a constant difference bootstrapped: percentiles of identical float64 values, up to summation rounding
    assert out["gain_vs_few_ci95"] == pytest.approx([0.3, 0.3])
    assert out["gap_closed_ci95"] == pytest.approx([0.3, 0.3])
    assert out["p_gain_positive"] == 1.0 and out["bootstrap_draws_out_of_range"] == 0


def test_noisy_samples_give_an_interval_around_the_effect():
    few = [scores(3.0, 2.0, spread=0.3, seed=1), scores(4.0, 3.0, spread=0.3, seed=2)]
    many = [scores(3.0, 1.0, spread=0.3, seed=3), scores(4.0, 2.0, spread=0.3, seed=4)]
    better = bootstrap_student(scores(3.5, 1.5, spread=0.3, seed=5), many, few, draws=400)
    lo, hi = better["gain_vs_few_ci95"]
    assert 0.0 < lo < 1.0 < hi < 2.0 and better["p_gain_positive"] == 1.0  # true gain 1.0
    same = bootstrap_student(scores(3.5, 2.5, spread=0.3, seed=6), many, few, draws=400)
    lo, hi = same["gain_vs_few_ci95"]
    assert lo < 0.0 < hi and 0.05 < same["p_gain_positive"] < 0.95  # true gain 0: the interval covers it
    # a student far outside the teacher curves: every draw dropped and counted, no interval
    out = bootstrap_student(scores(9.0, 1.0), many, few, draws=50)
    assert out["gain_vs_few_ci95"] is None and out["bootstrap_draws_out_of_range"] == 50


def test_summary_attaches_intervals_only_when_every_configuration_has_samples():
    base = {"benchmark": "synthetic", "quality_metric": "true_nll", "nfe": 16, "seconds_per_sample": 0.1,
            "evaluator": "x"}
    per = {}
    rows = []
    for model, rnd, steps, temp, ent, q in (("teacher", 0, 256, 0.7, 3.0, 1.0), ("teacher", 0, 256, 1.0, 4.0, 2.0),
                                             ("teacher", 0, 16, 0.7, 3.0, 2.0), ("teacher", 0, 16, 1.0, 4.0, 3.0),
                                             ("mcd", 2, 16, 1.0, 3.5, 2.2)):
        rows.append({**base, "model": model, "round": rnd, "steps": steps, "temperature": temp, "entropy": ent,
                     "quality": q})
        per[("synthetic", model, rnd, steps, temp)] = scores(ent, q)
    (s,) = summarize(rows, per, bootstrap_draws=100)
    # tolerance: float64 means/percentiles of constant differences: approx default rel 1e-6
    assert s["gain_vs_few_nats"] == pytest.approx(0.3) and s["gain_vs_few_ci95"] == pytest.approx([0.3, 0.3])
    del per[("synthetic", "teacher", 0, 16, 0.7)]
    (s,) = summarize(rows, per, bootstrap_draws=100)
    # tolerance: as above (float64 mean of a constant)
    assert s["gain_vs_few_ci95"] is None and s["gain_vs_few_nats"] == pytest.approx(0.3)


def test_no_interval_for_a_figure_undefined_at_the_point_estimate():
    base = {"benchmark": "synthetic", "quality_metric": "true_nll", "nfe": 16, "seconds_per_sample": 0.1,
            "evaluator": "x"}
    # teacher@256 no better than teacher@16: no gap, so "gap closed" is NaN; noisy samples make a few
    # bootstrap draws show a gap anyway, and those must not become an interval.
    curves = (("teacher", 0, 256, 0.7, 3.0, 2.0), ("teacher", 0, 256, 1.0, 4.0, 3.0),
              ("teacher", 0, 16, 0.7, 3.0, 2.0), ("teacher", 0, 16, 1.0, 4.0, 3.0), ("mcd", 2, 16, 1.0, 3.5, 2.3))
    rows, per = [], {}
    for i, (model, rnd, steps, temp, ent, q) in enumerate(curves):
        rows.append({**base, "model": model, "round": rnd, "steps": steps, "temperature": temp, "entropy": ent,
                     "quality": q})
        per[("synthetic", model, rnd, steps, temp)] = scores(ent, q, spread=0.05, seed=10 + i)
    (s,) = summarize(rows, per, bootstrap_draws=200)
    raw = bootstrap_student(per[("synthetic", "mcd", 2, 16, 1.0)],
                            [per[("synthetic", "teacher", 0, 256, t)] for t in (0.7, 1.0)],
                            [per[("synthetic", "teacher", 0, 16, t)] for t in (0.7, 1.0)], draws=200)
    assert raw["gap_closed_ci95"] is not None, "the case must produce draws with a gap, or it tests nothing"
    assert np.isnan(s["gap_closed"]) and s["gap_closed_ci95"] is None
    # tolerance: as above (float64 mean of a constant)
    assert s["gain_vs_few_nats"] == pytest.approx(0.2) and s["gain_vs_few_ci95"] is not None
