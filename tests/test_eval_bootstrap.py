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


def shared_noise_configs(n: int = 40, seed: int = 0):
    """Teacher curves and a student whose sample i shares a large common noise term (as keyed noise does):
    true gain of the student over teacher@n = 0.1 nats, gap closed 0.1; entropy identical across configurations."""
    rng = np.random.default_rng(seed)
    common = 1.0 * rng.standard_normal(n)           # shared by sample i of every configuration
    own = lambda: 0.02 * rng.standard_normal(n)     # noqa: E731 - each configuration's own noise
    ent = lambda e: np.full(n, e)                   # noqa: E731
    tok = np.full(n, 100.0)
    few = [SampleScores(2.0 + common + own(), tok, ent(3.0)), SampleScores(3.0 + common + own(), tok, ent(4.0))]
    many = [SampleScores(1.0 + common + own(), tok, ent(3.0)), SampleScores(2.0 + common + own(), tok, ent(4.0))]
    student = SampleScores(2.4 + common + own(), tok, ent(3.5))
    return student, many, few


def test_paired_bootstrap_cancels_shared_noise():
    student, many, few = shared_noise_configs()
    paired = bootstrap_student(student, many, few, draws=300)
    unpaired = bootstrap_student(student, many, few, draws=300, paired=False)
    assert paired["paired"] is True and unpaired["paired"] is False
    lo, hi = paired["gain_vs_few_ci95"]
    # the shared noise (sd 1 per sample, ~0.16 on a 40-sample mean) cancels; what is left is sd 0.02 per
    # sample: the interval is a few hundredths wide around the true 0.1
    assert lo < 0.1 < hi and hi - lo < 0.05
    ulo, uhi = unpaired["gain_vs_few_ci95"]
    assert uhi - ulo > 5 * (hi - lo)
    glo, ghi = paired["gap_closed_ci95"]
    assert glo < 0.1 < ghi and ghi - glo < 0.05


def test_paired_needs_equal_counts_and_falls_back_otherwise():
    student, many, few = shared_noise_configs()
    short = SampleScores(few[0].nll[:30], few[0].tokens[:30], few[0].entropy[:30])
    out = bootstrap_student(student, many, [short, few[1]], draws=20)
    assert out["paired"] is False
    with pytest.raises(ValueError, match="equal sample counts"):
        bootstrap_student(student, many, [short, few[1]], draws=20, paired=True)


def test_draws_outside_a_curve_are_counted_by_cause_not_dropped_silently():
    # the student sits at the curves' upper edge: about half the draws put it outside teacher@n's curve
    few = [scores(3.0, 2.0), scores(4.0, 3.0)]
    many = [scores(3.0, 1.0), scores(4.0, 2.0)]
    # entropies symmetric about 4.0 (mean exactly the curves' edge): a draw's mean lands on either side
    edge = SampleScores(np.full(40, 2.5), np.full(40, 100.0), 4.0 + 0.05 * np.tile([1.0, -1.0], 20))
    out = bootstrap_student(edge, many, few, draws=200)
    assert 40 < out["draws_outside_few_curve"] < 160
    assert out["draws_outside_many_curve"] == 0 and out["draws_without_gap"] == 0
    assert out["gain_draws_used"] == pytest.approx(1 - out["draws_outside_few_curve"] / 200)
    assert out["bootstrap_draws_out_of_range"] == out["draws_outside_few_curve"]
    # teacher@N's curve shorter than teacher@n's: counted as outside the many-step curve
    short_many = [scores(3.0, 1.0), scores(3.8, 1.8)]
    out = bootstrap_student(edge, short_many, few, draws=200)
    assert out["draws_outside_many_curve"] > 0
    assert out["gap_draws_used"] == pytest.approx(
        1 - (out["draws_outside_few_curve"] + out["draws_outside_many_curve"]) / 200)


def _rows_and_scores(curves, spread=0.0):
    base = {"benchmark": "synthetic", "quality_metric": "true_nll", "nfe": 16, "seconds_per_sample": 0.1,
            "evaluator": "x"}
    rows, per = [], {}
    for i, (model, rnd, steps, temp, ent, q) in enumerate(curves):
        rows.append({**base, "model": model, "round": rnd, "steps": steps, "temperature": temp, "entropy": ent,
                     "quality": q})
        per[("synthetic", model, rnd, steps, temp)] = scores(ent, q, spread=spread, seed=20 + i)
    return rows, per


def test_report_marks_conditional_intervals_and_names_dropped_draws():
    from mcd_scale.eval.report import render_summary_table
    rows, per = _rows_and_scores((("teacher", 0, 256, 0.7, 3.0, 1.0), ("teacher", 0, 256, 1.0, 4.0, 2.0),
                                  ("teacher", 0, 16, 0.7, 3.0, 2.0), ("teacher", 0, 16, 1.0, 4.0, 3.0),
                                  ("mcd", 2, 16, 1.0, 3.999, 2.5)), spread=0.02)
    (s,) = summarize(rows, per, bootstrap_draws=200)
    assert s["paired"] is True and s["draws_outside_few_curve"] > 10
    text = "\n".join(render_summary_table([s]))
    assert "]*" in text and f"{s['draws_outside_few_curve']} of 200 draws outside teacher@n's curve" in text


def test_summary_names_a_student_temperature_missing_from_a_teacher_curve():
    curves = [("teacher", 0, 256, 0.8, 3.0, 1.0), ("teacher", 0, 256, 1.0, 4.0, 2.0),
              ("teacher", 0, 16, 0.8, 3.0, 2.0), ("teacher", 0, 16, 1.0, 4.0, 3.0), ("mcd", 2, 16, 0.9, 3.5, 2.2)]
    rows, per = _rows_and_scores(curves)
    (s,) = summarize(rows, per, bootstrap_draws=10)
    assert "teacher@256 has no T = 0.9 point" in s["note"] and "teacher@16 has no T = 0.9 point" in s["note"]
    rows, per = _rows_and_scores(curves + [("teacher", 0, 256, 0.9, 3.5, 1.5), ("teacher", 0, 16, 0.9, 3.5, 2.5)])
    (s,) = summarize(rows, per, bootstrap_draws=10)
    assert "no T =" not in s["note"]


def test_bootstrap_difference_is_paired_over_sample_index():
    from mcd_scale.eval.bootstrap import bootstrap_difference
    student, _, few = shared_noise_configs()
    a, b = student, SampleScores(student.nll - 0.1 + 0.02 * np.random.default_rng(1).standard_normal(40),
                                 student.tokens, student.entropy)
    out = bootstrap_difference(a, b, draws=300)
    lo, hi = out["quality_diff_ci95"]
    assert out["paired"] and lo < 0.1 < hi and hi - lo < 0.03
    ulo, uhi = bootstrap_difference(a, b, draws=300, paired=False)["quality_diff_ci95"]
    assert uhi - ulo > 5 * (hi - lo)


def test_share_of_an_ideal_is_read_on_the_same_resampled_curves():
    from mcd_scale.eval.bootstrap import bootstrap_share
    student, many, few = shared_noise_configs()           # student closes 0.1 of the gap at entropy 3.5
    rng = np.random.default_rng(7)
    ideal = SampleScores(student.nll - 0.3 + 0.02 * rng.standard_normal(40), student.tokens,
                         student.entropy)                  # closes 0.4 at the same entropy
    out = bootstrap_share(student, ideal, many, few, draws=300)
    lo, hi = out["share_ci95"]
    assert out["paired"] and out["draws_undefined"] == 0 and lo < 0.25 < hi and hi - lo < 0.2
    # an ideal outside the curves: every draw undefined and counted, no interval
    far = SampleScores(ideal.nll, ideal.tokens, np.full(40, 9.0))
    out = bootstrap_share(student, far, many, few, draws=50)
    assert out["share_ci95"] is None and out["draws_undefined"] == 50
