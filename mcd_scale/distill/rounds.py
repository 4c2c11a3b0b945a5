"""Distillation rounds: step size dt_n, teacher temperature tau_n, and the (t, s) pair of a step.

Round n trains a student to match, in one step of size dt_n, what the round's frozen teacher does
from z_s with s = t - dt_n. dt grows each round ('double': dt0 * 2^n, as in SDTT/DUO; 'linear':
dt0 * (n + 1)), and at each round boundary the teacher becomes the current student (docs/distill.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mcd_scale.config import DistillConfig
from mcd_scale.config import round_dt as schema_round_dt
from mcd_scale.diffusion.sampling import T_END, sampling_times


def _check_round(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"round must be a non-negative integer, got {n!r}.")


def round_dt(cfg: DistillConfig, n: int) -> float:
    """Step size of round n: dt0 * 2^n ('double') or dt0 * (n + 1) ('linear')."""
    _check_round(n)
    return schema_round_dt(cfg.dt0, cfg.dt_growth, n)


def round_temperature(cfg: DistillConfig, n: int) -> float:
    """Teacher temperature of round n: 'paper' max(start - step*n, floor); 'constant' start; 'off' 1."""
    _check_round(n)
    tc = cfg.temperature
    if tc.schedule == "paper":
        return max(tc.start - tc.step * n, tc.floor)
    if tc.schedule == "constant":
        return tc.start
    if tc.schedule == "off":
        return 1.0
    raise ValueError(f"'distill.temperature.schedule' = {tc.schedule!r} is not one of 'paper', 'constant', 'off'.")


def _checked_times(t: torch.Tensor, t_min: float) -> torch.Tensor:
    """t as float64, after checking t_min in (0, 1) and every t in [t_min, 1] (both pair maps' input)."""
    if not 0.0 < t_min < 1.0:
        raise ValueError(f"t_min must be in (0, 1), got {t_min}.")
    t64 = t.double()
    if t64.numel() and (t64.min() < t_min - 1e-9 or t64.max() > 1.0 + 1e-9):
        raise ValueError(f"sampled times must lie in [t_min={t_min}, 1]; got [{float(t64.min())}, "
                         f"{float(t64.max())}].")
    return t64


def coupled_times(t: torch.Tensor, dt: float, t_min: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Map sampled times t in [t_min, 1] to a pair (t', s) with s = t' - dt, s >= t_min, t' <= 1.

    The map is affine, s = t_min + (t - t_min) (1 - t_min - dt) / (1 - t_min): it sends the uniform
    law on [t_min, 1] to the uniform law on [t_min, 1 - dt] and preserves order, so antithetic
    (stratified) samples stay stratified. Clamping t up to t_min + dt instead would pile a point mass
    of probability dt on one time. Computed in float64 (dt can be ~2e-3 and s - t must be dt).
    """
    t64 = _checked_times(t, t_min)
    if not 0.0 < dt <= 1.0 - t_min:
        raise ValueError(f"dt = {dt} must be in (0, 1 - t_min = {1.0 - t_min}]: the round's step does not "
                         f"fit in [t_min, 1] (lower 'distill.dt0' or 'distill.rounds').")
    s = t_min + (t64.clamp(t_min, 1.0) - t_min) * ((1.0 - t_min - dt) / (1.0 - t_min))
    t_new = (s + dt).clamp(max=1.0)
    return t_new.to(t.dtype), s.to(t.dtype)


TIME_MODES = ("uniform", "grid")


def grid_times(t: torch.Tensor, dt: float, t_min: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Map sampled times t in [t_min, 1] to a step (t', s) of the sampler's own grid of n = 1/dt steps.

    ``distill.times: grid`` (distilling for the sampler's order): the sampler only ever runs a
    student from t_k to t_{k+1} of ``sampling_times(n)`` (linspace(1, T_END, n + 1)), so with the strided
    reveal order it only ever shows the student z_t with whole residue classes revealed. A uniform t
    (:func:`coupled_times`) trains it on partial classes it never sees. Here the quantile of t in
    [t_min, 1] picks step k (k = n - 1 - floor(n (t - t_min) / (1 - t_min))), so stratified t's stay
    stratified over the n steps and a larger t picks an earlier (noisier) step. t' - s = (1 - T_END) / n,
    not exactly dt (:func:`pair_span`). dt must be 1/n for an integer n (within 1e-9).
    """
    n = round(1.0 / dt) if dt > 0 else 0
    if n < 1 or abs(n * dt - 1.0) > 1e-9:
        raise ValueError(f"'distill.times: grid' needs every round's dt to be 1/n for a whole number of sampler "
                         f"steps n; got dt = {dt:.6g} (derive 'distill.dt0' with dt0_for_sampler_steps).")
    t64 = _checked_times(t, t_min)
    grid = sampling_times(n).to(t64.device)  # decreasing: 1 = t_0 > t_1 > ... > t_n = T_END
    frac = ((t64 - t_min) / (1.0 - t_min)).clamp(0.0, 1.0)
    k = (n - 1 - (frac * n).floor().long().clamp(max=n - 1))
    return grid[k].to(t.dtype), grid[k + 1].to(t.dtype)


def round_times(t: torch.Tensor, dt: float, t_min: float, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (t, s) pair of ``distill.times`` = ``mode``: 'uniform' (:func:`coupled_times`) or 'grid'
    (:func:`grid_times`). The one place the online objective and the precompute job turn a raw t into a pair."""
    if mode == "uniform":
        return coupled_times(t, dt, t_min)
    if mode == "grid":
        return grid_times(t, dt, t_min)
    raise ValueError(f"'distill.times' = {mode!r} is not one of {TIME_MODES}.")


def pair_span(dt: float, mode: str) -> float:
    """t - s of every pair :func:`round_times` makes: dt ('uniform'), (1 - T_END) dt ('grid')."""
    return dt if mode == "uniform" else (1.0 - T_END) * dt


@dataclass(frozen=True)
class RoundPlan:
    """What the driver runs in one round."""
    round: int
    dt: float
    temperature: float
    steps: int

    @property
    def sampler_steps(self) -> float:
        """1 / dt: the number of sampler steps of this round's size that cover [0, 1]."""
        return 1.0 / self.dt


def plan_rounds(cfg: DistillConfig, t_min: float = 1e-3) -> list[RoundPlan]:
    """One :class:`RoundPlan` per round 0 .. rounds-1. Fails early if a late round's dt does not fit."""
    if cfg.rounds < 1:
        raise ValueError(f"'distill.rounds' must be >= 1, got {cfg.rounds}.")
    if cfg.steps_per_round < 1:
        raise ValueError(f"'distill.steps_per_round' must be >= 1, got {cfg.steps_per_round}.")
    plans = []
    for n in range(cfg.rounds):
        dt = round_dt(cfg, n)
        if dt > 1.0 - t_min:
            raise ValueError(f"round {n}: dt = {dt:.4g} exceeds 1 - t_min = {1.0 - t_min}; with "
                             f"'distill.dt0' = {cfg.dt0} and '{cfg.dt_growth}' growth at most "
                             f"{n} rounds fit (lower 'distill.rounds' or 'distill.dt0').")
        plans.append(RoundPlan(n, dt, round_temperature(cfg, n), cfg.steps_per_round))
    return plans


# ------------------------------------------------------------------------------------------------------
# What a student learns, per objective: the one place the round schedule meets the sampler.
#
# A student sampled with N steps must have been trained for jumps of 1/N (docs/method.md section 5). MCD's
# teacher looks at z_s, s = t - dt_n, so round n's student learns a jump of dt_n; SDTT's teacher takes
# ``sdtt_teacher_steps`` ancestral steps of dt_n, so its student learns a jump of k * dt_n. Giving both
# objectives the same dt0 (as the demo once did) trains the SDTT student for k-times longer jumps than
# the step count it is then sampled at.
DISTILL_OBJECTIVES = ("mcd", "sdtt")


def teacher_steps_per_jump(cfg: DistillConfig, objective: str) -> int:
    """How many teacher steps of size dt_n one student step replaces: 1 (MCD), sdtt_teacher_steps (SDTT)."""
    if objective == "mcd":
        return 1
    if objective == "sdtt":
        if cfg.sdtt_teacher_steps < 1:
            raise ValueError(f"'distill.sdtt_teacher_steps' must be >= 1, got {cfg.sdtt_teacher_steps}.")
        return cfg.sdtt_teacher_steps
    raise ValueError(f"objective {objective!r} is not one of {DISTILL_OBJECTIVES}.")


def student_jump(cfg: DistillConfig, n: int, objective: str) -> float:
    """The time span round n's student learns to cover in one step: dt_n times the teacher steps it replaces."""
    return round_dt(cfg, n) * teacher_steps_per_jump(cfg, objective)


def trained_sampler_steps(cfg: DistillConfig, objective: str, n: Optional[int] = None) -> Optional[int]:
    """The sampler step count round n's student (default: ``cfg.round``) was trained for: 1 / jump, when
    that is an integer (within 1e-6); None when the jump does not divide [0, 1] into whole steps."""
    jump = student_jump(cfg, cfg.round if n is None else n, objective)
    steps = round(1.0 / jump)
    return steps if steps >= 1 and abs(steps * jump - 1.0) < 1e-6 else None


def dt0_for_sampler_steps(cfg: DistillConfig, objective: str, sampler_steps: int, rounds: int) -> float:
    """The dt0 that makes round ``rounds - 1`` of ``objective`` learn the jump 1 / ``sampler_steps``.

    ``double``: dt0 = 1 / (N * 2^(R-1) * k); ``linear``: dt0 = 1 / (N * R * k), k = teacher steps per jump.
    """
    if sampler_steps < 1 or rounds < 1:
        raise ValueError(f"need sampler_steps >= 1 and rounds >= 1, got {sampler_steps} and {rounds}.")
    k = teacher_steps_per_jump(cfg, objective)
    if cfg.dt_growth == "double":
        growth = 2.0 ** (rounds - 1)
    elif cfg.dt_growth == "linear":
        growth = float(rounds)
    else:
        raise ValueError(f"'distill.dt_growth' = {cfg.dt_growth!r} is not one of 'double', 'linear'.")
    return 1.0 / (sampler_steps * growth * k)


def checkpoint_trained_steps(model_cfg) -> Optional[int]:
    """The sampler step count a loaded checkpoint was distilled for, read from the resolved config saved
    with it (``train.objective``, ``distill.round``, ``dt0``, ``dt_growth``, ``sdtt_teacher_steps``);
    None for a model that is not a distilled student (a teacher: any step count is its own)."""
    objective = model_cfg.train.objective
    if objective not in DISTILL_OBJECTIVES:
        return None
    return trained_sampler_steps(model_cfg.distill, objective)
