"""Quality–entropy frontiers and the matched-entropy "gap closed" (docs/method.md §8).

Lowering the sampling temperature lowers both Gen PPL (or true NLL) and entropy, and so can a
distillation round that sharpens its teacher. A quality number alone therefore proves nothing: each
model is sampled at several temperatures, giving points (entropy, quality) with lower quality = better,
and models are compared at equal entropy by piecewise-linear interpolation along each model's curve.
Interpolation never extrapolates: an entropy outside a curve's range is reported as out of range.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

PointLike = Union["FrontierPoint", tuple[float, float], Sequence[float]]


@dataclass(frozen=True)
class FrontierPoint:
    """One sampling configuration of one model: mean unigram entropy (nats) and quality (lower = better)."""
    entropy: float
    quality: float
    temperature: float | None = None


@dataclass(frozen=True)
class Interpolated:
    """A curve's quality at an entropy. ``quality`` is NaN when ``in_range`` is False (never extrapolated)."""
    quality: float
    in_range: bool
    entropy: float
    entropy_min: float
    entropy_max: float


@dataclass(frozen=True)
class GapClosed:
    """fraction = (q_few - q_student) / (q_few - q_many), both teachers read at the student's entropy.

    1 means the student matches the many-step teacher, 0 the few-step teacher; NaN with a ``note``
    when a teacher curve does not cover the student's entropy or there is no gap to close.
    """
    fraction: float
    entropy: float
    student_quality: float
    teacher_many_quality: float
    teacher_few_quality: float
    note: str = ""


def _as_point(p: PointLike) -> FrontierPoint:
    if isinstance(p, FrontierPoint):
        return p
    entropy, quality = p[0], p[1]
    return FrontierPoint(float(entropy), float(quality))


def sorted_curve(points: Iterable[PointLike]) -> list[FrontierPoint]:
    """Points sorted by entropy; points of (numerically) equal entropy are merged by mean quality."""
    pts = sorted((_as_point(p) for p in points), key=lambda p: p.entropy)
    if not pts:
        raise ValueError("a frontier needs at least one (entropy, quality) point")
    for p in pts:
        if not (math.isfinite(p.entropy) and math.isfinite(p.quality)):
            raise ValueError(f"frontier point {p} is not finite")
    merged: list[list[float]] = []
    for p in pts:
        if merged and abs(p.entropy - merged[-1][0]) <= 1e-12:
            merged[-1][1] += p.quality
            merged[-1][2] += 1
        else:
            merged.append([p.entropy, p.quality, 1])
    return [FrontierPoint(e, q / n) for e, q, n in merged]


def interpolate_quality_at_entropy(points: Iterable[PointLike], entropy: float) -> Interpolated:
    """Piecewise-linear quality of the entropy-sorted curve at ``entropy`` (no extrapolation).

    The curve is the model's points in entropy order (one per temperature), not a convex hull: a
    temperature sweep is one path through (entropy, quality), and we read it where the other model sits.
    """
    curve = sorted_curve(points)
    lo, hi = curve[0].entropy, curve[-1].entropy
    if not lo - 1e-12 <= entropy <= hi + 1e-12:
        return Interpolated(math.nan, False, float(entropy), lo, hi)
    if len(curve) == 1:
        return Interpolated(curve[0].quality, True, float(entropy), lo, hi)
    for left, right in zip(curve[:-1], curve[1:]):
        if entropy <= right.entropy + 1e-12:
            w = min(max((entropy - left.entropy) / (right.entropy - left.entropy), 0.0), 1.0)
            return Interpolated(left.quality + w * (right.quality - left.quality), True, float(entropy), lo, hi)
    return Interpolated(curve[-1].quality, True, float(entropy), lo, hi)  # pragma: no cover - guarded above


def gap_closed(teacher_many_points: Iterable[PointLike], teacher_few_points: Iterable[PointLike],
               student_point: PointLike) -> GapClosed:
    """Fraction of the teacher@N vs teacher@n quality gap that the student (at n steps) closes.

    Both teacher curves are interpolated at the student's entropy, so a student that only lowered its
    entropy is compared with equally cold teachers and gets no credit for the temperature effect.
    """
    s = _as_point(student_point)
    many = interpolate_quality_at_entropy(teacher_many_points, s.entropy)
    few = interpolate_quality_at_entropy(teacher_few_points, s.entropy)
    notes = [f"{name} curve covers entropy [{i.entropy_min:.4g}, {i.entropy_max:.4g}], not {s.entropy:.4g}"
             for name, i in (("many-step teacher", many), ("few-step teacher", few)) if not i.in_range]
    if notes:
        return GapClosed(math.nan, s.entropy, s.quality, many.quality, few.quality, "; ".join(notes))
    gap = few.quality - many.quality
    if gap <= 0:
        return GapClosed(math.nan, s.entropy, s.quality, many.quality, few.quality,
                         f"no gap: the few-step teacher is not worse at this entropy ({gap:.4g})")
    return GapClosed((few.quality - s.quality) / gap, s.entropy, s.quality, many.quality, few.quality)
