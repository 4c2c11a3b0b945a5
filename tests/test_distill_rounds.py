"""Round schedules: dt growth, teacher temperature, coupled (t, s) times, the round plan."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mcd_scale.config import DistillConfig, TemperatureConfig
from mcd_scale.distill.rounds import coupled_times, plan_rounds, round_dt, round_temperature


def _cfg(**kw) -> DistillConfig:
    temp = kw.pop("temperature", TemperatureConfig())
    return dataclasses.replace(DistillConfig(), temperature=temp, **kw)


def test_round_dt_double_and_linear():
    cfg = _cfg(dt0=1 / 512, dt_growth="double")
    assert [round_dt(cfg, n) for n in range(4)] == [1 / 512, 2 / 512, 4 / 512, 8 / 512]
    cfg = _cfg(dt0=0.01, dt_growth="linear")
    # tolerance: one float64 product each (dt0 * (n + 1)): exact up to 1 ulp (~3e-18 at 0.03)
    assert [round_dt(cfg, n) for n in range(3)] == pytest.approx([0.01, 0.02, 0.03], abs=1e-15)
    with pytest.raises(ValueError, match="non-negative"):
        round_dt(cfg, -1)
    with pytest.raises(ValueError, match="dt_growth"):
        round_dt(_cfg(dt_growth="triple"), 0)


def test_round_temperature_schedules():
    paper = _cfg(temperature=TemperatureConfig("paper", start=0.96, step=0.03, floor=0.75))
    want = [0.96, 0.93, 0.90, 0.87, 0.84, 0.81, 0.78, 0.75, 0.75, 0.75]
    # tolerance: start - step * n in float64 vs the same written out: a few ulp
    assert [round_temperature(paper, n) for n in range(10)] == pytest.approx(want, abs=1e-12)
    const = _cfg(temperature=TemperatureConfig("constant", start=0.9))
    assert {round_temperature(const, n) for n in range(5)} == {0.9}
    off = _cfg(temperature=TemperatureConfig("off"))
    assert {round_temperature(off, n) for n in range(5)} == {1.0}


def test_coupled_times_bounds_gap_and_order():
    dt, t_min = 1 / 64, 1e-3
    t = torch.linspace(t_min, 1.0, 1001, dtype=torch.float64)
    t2, s = coupled_times(t, dt, t_min)
    # tolerance: (s + dt) - s in float64 on numbers <= 1: <= 2 ulp (4e-16)
    assert torch.allclose(t2 - s, torch.full_like(s, dt), atol=1e-12)
    assert float(s.min()) >= t_min and float(t2.max()) <= 1.0
    # tolerance: approx's default rel 1e-6 on float64 affine maps of the endpoints (exact to a few ulp)
    assert float(s[0]) == pytest.approx(t_min) and float(t2[-1]) == pytest.approx(1.0)
    assert bool((torch.diff(t2) > 0).all())  # order (hence stratification) preserved
    # uniform in, uniform out: the mean of s over an even grid is the midpoint of [t_min, 1 - dt]
    # tolerance: float64 mean of an evenly spaced grid: the closed form up to summation rounding (~n * 1e-16)
    assert float(s.mean()) == pytest.approx((t_min + 1 - dt) / 2, rel=1e-9)


def test_coupled_times_float32_and_errors():
    t = torch.tensor([1e-3, 0.5, 1.0], dtype=torch.float32)
    t2, s = coupled_times(t, 0.25)
    assert t2.dtype == s.dtype == torch.float32 and float(s.min()) >= 1e-3 and float(t2.max()) <= 1.0
    with pytest.raises(ValueError, match="does not fit"):
        coupled_times(t, 1.0)
    with pytest.raises(ValueError, match="must lie in"):
        coupled_times(torch.tensor([0.0]), 0.1)


def test_plan_rounds_lists_each_round_and_rejects_oversized_dt():
    cfg = _cfg(rounds=5, steps_per_round=7, dt0=1 / 512)
    plans = plan_rounds(cfg)
    assert [p.round for p in plans] == list(range(5))
    assert [p.dt for p in plans] == [round_dt(cfg, n) for n in range(5)]
    assert [p.temperature for p in plans] == [round_temperature(cfg, n) for n in range(5)]
    # tolerance: 1 / dt in float64 (dt a power-of-two multiple): exact up to rounding; approx default rel 1e-6
    assert {p.steps for p in plans} == {7} and plans[-1].sampler_steps == pytest.approx(32.0)
    with pytest.raises(ValueError, match="round 8: dt = 1 "):
        plan_rounds(_cfg(rounds=10, dt0=1 / 256))
