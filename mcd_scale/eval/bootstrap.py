"""Bootstrap confidence intervals for the matched-entropy summary.

A report row is a mean over a few dozen samples, so "vs teacher@n" and "gap closed" carry a Monte-Carlo
error of the same order as the effects we look for (~0.05 nats per point at 32 samples). Each bootstrap
draw resamples the samples of *every* configuration (student and each teacher temperature), rebuilds the
teacher curves and reads them at the student's resampled entropy, exactly as the point estimate does
(curves in nats per token: true NLL, or log Gen PPL = the evaluator's token-weighted NLL).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from mcd_scale.eval.frontier import interpolate_quality_at_entropy


@dataclass
class SampleScores:
    """Per-sample scores of one configuration: NLL per token (nats), scored tokens, unigram entropy."""
    nll: np.ndarray
    tokens: np.ndarray
    entropy: np.ndarray

    def point(self, idx: np.ndarray) -> tuple[float, float]:
        """(mean entropy, token-weighted NLL per token) of the samples ``idx``."""
        n = self.tokens[idx]
        return float(self.entropy[idx].mean()), float((self.nll[idx] * n).sum() / n.sum())


def _percentiles(values: np.ndarray) -> Optional[list[float]]:
    finite = values[np.isfinite(values)]
    return [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))] if finite.size else None


def bootstrap_student(student: SampleScores, teacher_many: Sequence[SampleScores],
                      teacher_few: Sequence[SampleScores], draws: int = 1000, seed: int = 0) -> dict:
    """95% intervals of "vs teacher@n" (teacher@n − student, nats/token) and "gap closed", plus the
    share of draws where the student beats teacher@n. Draws whose student entropy falls outside a
    teacher curve are dropped and counted. An empty ``teacher_many`` skips "gap closed"."""
    rng = np.random.default_rng(seed)
    gains, gaps = np.full(draws, math.nan), np.full(draws, math.nan)

    def resample(s: SampleScores) -> tuple[float, float]:
        return s.point(rng.integers(0, len(s.nll), len(s.nll)))

    for d in range(draws):
        e, q = resample(student)
        few = interpolate_quality_at_entropy([resample(s) for s in teacher_few], e)
        if few.in_range:
            gains[d] = few.quality - q
            if not teacher_many:
                continue
            many = interpolate_quality_at_entropy([resample(s) for s in teacher_many], e)
            if many.in_range and few.quality > many.quality:
                gaps[d] = (few.quality - q) / (few.quality - many.quality)
    finite = np.isfinite(gains)
    return {"gain_vs_few_ci95": _percentiles(gains), "gap_closed_ci95": _percentiles(gaps),
            "p_gain_positive": float(np.mean(gains[finite] > 0)) if finite.any() else None,
            "bootstrap_draws": draws, "bootstrap_draws_out_of_range": int(draws - finite.sum())}
