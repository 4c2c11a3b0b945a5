"""Bootstrap confidence intervals for the matched-entropy summary.

A report row is a mean over a few dozen samples, so "vs teacher@n" and "gap closed" carry a Monte-Carlo
error of the same order as the effects we look for (~0.05 nats per point at 32 samples). Each bootstrap
draw resamples the samples of *every* configuration (student and each teacher temperature), rebuilds the
teacher curves and reads them at the student's resampled entropy, exactly as the point estimate does
(curves in nats per token: true NLL, or log Gen PPL = the evaluator's token-weighted NLL).

**Paired over sample index.** The samplers key every random draw of sample i by (purpose, i, seed)
(mcd_scale/rng.py), so sample i of the student and sample i of each teacher configuration share their
keyed reveal and Gumbel noise, and the tuples (sample i of every configuration) are independent across i.
When every configuration has the same number of samples (in sample-index order, as tools/evaluate.py
keeps them), one index vector is drawn per bootstrap draw and used for all of them: the shared noise
cancels in the differences and the interval is the right one (and narrower). Otherwise (or with
``paired=False``) each configuration is resampled on its own, and the result says so (``paired``).

**Nothing dropped silently.** A draw whose student entropy falls outside a teacher curve, or whose
teacher@N is not better than teacher@n there, has no value; such draws are counted per cause
(``draws_outside_few_curve``, ``draws_outside_many_curve``, ``draws_without_gap``) and the share of draws
that carry each interval is reported (``gain_draws_used``, ``gap_draws_used``). The percentiles are taken
over the draws that have a value, so an interval resting on fewer than ``1 - MAX_DROPPED_SHARE`` of the
draws is conditional on the student lying inside the curves (it leans toward the curve's interior, where
the student sits near its edge) and the report marks it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from mcd_scale.eval.frontier import interpolate_quality_at_entropy

# An interval resting on fewer draws than this share is marked as conditional in the report.
MAX_DROPPED_SHARE = 0.05


@dataclass
class SampleScores:
    """Per-sample scores of one configuration, in sample-index order: NLL per token (nats), scored tokens,
    unigram entropy."""
    nll: np.ndarray
    tokens: np.ndarray
    entropy: np.ndarray

    def __len__(self) -> int:
        return len(self.nll)

    def point(self, idx: np.ndarray) -> tuple[float, float]:
        """(mean entropy, token-weighted NLL per token) of the samples ``idx``."""
        n = self.tokens[idx]
        return float(self.entropy[idx].mean()), float((self.nll[idx] * n).sum() / n.sum())


def _percentiles(values: np.ndarray) -> Optional[list[float]]:
    finite = values[np.isfinite(values)]
    return [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))] if finite.size else None


def can_pair(configs: Sequence[SampleScores]) -> bool:
    """Whether a paired bootstrap over sample index applies: every configuration has the same sample count."""
    return len({len(c) for c in configs}) == 1


def bootstrap_student(student: SampleScores, teacher_many: Sequence[SampleScores],
                      teacher_few: Sequence[SampleScores], draws: int = 1000, seed: int = 0,
                      paired: Optional[bool] = None) -> dict:
    """95% intervals of "vs teacher@n" (teacher@n − student, nats/token) and "gap closed", plus the
    share of draws where the student beats teacher@n (module docstring: pairing and counted draws).
    ``paired``: None = paired whenever every configuration has the same sample count; True requires it.
    An empty ``teacher_many`` skips "gap closed"."""
    configs = [student, *teacher_many, *teacher_few]
    if paired is None:
        paired = can_pair(configs)
    elif paired and not can_pair(configs):
        raise ValueError(f"a paired bootstrap needs equal sample counts, got {sorted({len(c) for c in configs})}")
    rng = np.random.default_rng(seed)
    gains, gaps = np.full(draws, math.nan), np.full(draws, math.nan)
    out_few = out_many = no_gap = 0
    n_shared = len(student)

    for d in range(draws):
        if paired:
            idx = rng.integers(0, n_shared, n_shared)
            pick = lambda s: s.point(idx)  # noqa: E731 - the same samples for every configuration
        else:
            pick = lambda s: s.point(rng.integers(0, len(s), len(s)))  # noqa: E731
        e, q = pick(student)
        few_pts = [pick(s) for s in teacher_few]
        many_pts = [pick(s) for s in teacher_many]
        few = interpolate_quality_at_entropy(few_pts, e)
        if not few.in_range:
            out_few += 1
            continue
        gains[d] = few.quality - q
        if not teacher_many:
            continue
        many = interpolate_quality_at_entropy(many_pts, e)
        if not many.in_range:
            out_many += 1
        elif few.quality > many.quality:
            gaps[d] = (few.quality - q) / (few.quality - many.quality)
        else:
            no_gap += 1
    finite = np.isfinite(gains)
    return {"gain_vs_few_ci95": _percentiles(gains), "gap_closed_ci95": _percentiles(gaps),
            "p_gain_positive": float(np.mean(gains[finite] > 0)) if finite.any() else None,
            "paired": bool(paired), "bootstrap_draws": draws,
            "draws_outside_few_curve": out_few, "draws_outside_many_curve": out_many,
            "draws_without_gap": no_gap,
            "gain_draws_used": float(finite.mean()) if draws else 0.0,
            "gap_draws_used": float(np.isfinite(gaps).mean()) if draws and teacher_many else 0.0,
            "bootstrap_draws_out_of_range": out_few + out_many}


def bootstrap_difference(a: SampleScores, b: SampleScores, draws: int = 1000, seed: int = 0,
                         paired: Optional[bool] = None) -> dict:
    """95% interval of quality(a) − quality(b) (nats/token, token-weighted) and of entropy(a) − entropy(b),
    paired over sample index when both have the same count (module docstring)."""
    if paired is None:
        paired = can_pair([a, b])
    elif paired and not can_pair([a, b]):
        raise ValueError(f"a paired bootstrap needs equal sample counts, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    dq, de = np.empty(draws), np.empty(draws)
    for d in range(draws):
        ia = rng.integers(0, len(a), len(a))
        ib = ia if paired else rng.integers(0, len(b), len(b))
        (ea, qa), (eb, qb) = a.point(ia), b.point(ib)
        dq[d], de[d] = qa - qb, ea - eb
    return {"quality_diff_ci95": _percentiles(dq), "entropy_diff_ci95": _percentiles(de), "paired": bool(paired),
            "bootstrap_draws": draws}


def bootstrap_share(student: SampleScores, ideal: SampleScores, teacher_many: Sequence[SampleScores],
                    teacher_few: Sequence[SampleScores], draws: int = 1000, seed: int = 0) -> dict:
    """95% interval of the student's share of an ideal's gap closed: gap_closed(student) / gap_closed(ideal),
    both read on the same resampled teacher curves in each draw. Paired over sample index when every
    configuration has the same count; otherwise each is resampled on its own (``paired`` says which).
    Draws where either is outside a curve, there is no gap, or the ideal closes none of it (share
    undefined) are counted in ``draws_undefined``."""
    configs = [student, ideal, *teacher_many, *teacher_few]
    paired = can_pair(configs)
    rng = np.random.default_rng(seed)
    shares = np.full(draws, math.nan)
    undefined = 0
    for d in range(draws):
        idx = rng.integers(0, len(student), len(student)) if paired else None
        pick = (lambda s: s.point(idx)) if paired else (lambda s: s.point(rng.integers(0, len(s), len(s))))
        (es, qs), (ei, qi) = pick(student), pick(ideal)
        many_pts, few_pts = [pick(s) for s in teacher_many], [pick(s) for s in teacher_few]
        closed = []
        for e, q in ((es, qs), (ei, qi)):
            m, f = interpolate_quality_at_entropy(many_pts, e), interpolate_quality_at_entropy(few_pts, e)
            ok = m.in_range and f.in_range and f.quality > m.quality
            closed.append((f.quality - q) / (f.quality - m.quality) if ok else math.nan)
        if math.isfinite(closed[0]) and math.isfinite(closed[1]) and closed[1] > 0:
            shares[d] = closed[0] / closed[1]
        else:
            undefined += 1
    return {"share_ci95": _percentiles(shares), "paired": bool(paired), "bootstrap_draws": draws,
            "draws_undefined": undefined}
