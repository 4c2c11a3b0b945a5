"""The SDTT baseline: the teacher's stochastic steps, per-token targets, the reverse-KL loss."""
from __future__ import annotations

import math

import pytest
import torch

from mcd_scale.diffusion.schedules import get_schedule
from mcd_scale.distill.sdtt import sdtt_loss, sdtt_rollout, sdtt_targets
from mcd_scale.rng import keyed_generator

V = 9
PADDED = 12


class SpyTeacher:
    """A deterministic teacher whose prediction depends on (z, t); it records every call."""

    def __init__(self, peaked: bool = False):
        self.peaked = peaked
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b, l = z.shape
        v = torch.arange(PADDED, dtype=torch.float64)
        pos = torch.arange(l, dtype=torch.float64).view(1, l, 1)
        n_masked = (z == V).sum(-1).double().view(b, 1, 1)
        if self.peaked:  # all mass on one id that moves with t and the position
            peak = ((pos * 3 + 10 * t.view(b, 1, 1)).round() % V)
            logits = torch.where(v.view(1, 1, -1) == peak, 0.0, float("-inf"))
        else:
            logits = 2.0 * torch.cos(v.view(1, 1, -1) * (1.0 + 7.0 * t.view(b, 1, 1)) + pos + 0.05 * n_masked)
        logits[..., V:] = float("-inf")
        logits = logits.float()
        self.calls.append((z.clone(), t.clone(), logits))
        return logits


def _setup(b: int = 3, l: int = 40, t: float = 0.5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (b, l), generator=g)
    z_t = torch.where(torch.rand(b, l, generator=g) < 1.0 - t, x, torch.full_like(x, V))
    gens = [keyed_generator("sdtt-test", seed, i) for i in range(b)]
    return z_t, torch.full((b,), t), gens


def test_each_token_targets_the_prediction_of_the_step_that_revealed_it():
    z_t, t, gens = _setup()
    teacher, tau = SpyTeacher(), 0.8
    target = sdtt_targets(teacher, z_t, t, 0.2, schedule=get_schedule("loglinear"), vocab_size=V,
                          generators=gens, n_steps=3, temperature=tau)
    assert len(teacher.calls) == 3
    for i, want_t in enumerate((0.5, 0.3, 0.1)):
        # tolerance: the teacher gets float32 times: allclose defaults (rtol 1e-5) > one float32 rounding (6e-8)
        assert torch.allclose(teacher.calls[i][1].double(), torch.full((3,), want_t, dtype=torch.float64))
    preds = [torch.log_softmax(logits[..., :V] / tau, -1) for _, _, logits in teacher.calls]
    zs = [z for z, _, _ in teacher.calls]
    revealed_at = [(zs[i] == V) & (zs[i + 1] != V) for i in range(2)]  # from the teacher's own inputs
    later = zs[2] == V  # revealed at the last step or never: both take the last prediction
    for i, where in enumerate(revealed_at):
        assert where.sum() > 0  # the test exercises every class
        assert torch.equal(target[where], preds[i][where])
    assert later.sum() > 0 and torch.equal(target[later], preds[2][later])
    kept = z_t != V  # revealed at t: carry-over point mass
    assert torch.equal(target[kept].argmax(-1), z_t[kept]) and torch.all(target[kept].max(-1).values == 0)


def test_revealed_values_are_drawn_from_the_teacher_prediction():
    z_t, t, gens = _setup(seed=1)
    teacher = SpyTeacher(peaked=True)
    roll = sdtt_rollout(teacher, z_t, t, 0.2, schedule=get_schedule("loglinear"), vocab_size=V,
                        generators=gens, n_steps=2)
    for i, (_, _, logits) in enumerate(teacher.calls):
        at_i = roll.reveal_step == i
        assert at_i.sum() > 0
        assert torch.equal(roll.z_final[at_i], logits[..., :V].argmax(-1)[at_i])  # the only id with mass
    assert torch.equal(roll.z_final[z_t != V], z_t[z_t != V])


def test_reveal_rate_matches_the_ancestral_probability():
    b, l, t, dt = 32, 128, 0.6, 0.15
    z_t = torch.full((b, l), V)
    gens = [keyed_generator("sdtt-rate", 7, i) for i in range(b)]
    sched = get_schedule("loglinear", 1e-3)
    roll = sdtt_rollout(SpyTeacher(), z_t, torch.full((b,), t), dt, schedule=sched, vocab_size=V,
                        generators=gens, n_steps=1)
    a_t, a_s = sched.alpha(torch.tensor(t)), sched.alpha(torch.tensor(t - dt))
    p = float((a_s - a_t) / (1 - a_t))
    rate = float((roll.reveal_step == 0).double().mean())
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / (b * l))


def test_times_clamp_at_the_floor_and_randomness_is_keyed():
    z_t, _, _ = _setup(b=2, seed=2)
    teacher = SpyTeacher()
    kw = dict(schedule=get_schedule("loglinear"), vocab_size=V, n_steps=3)
    roll = sdtt_rollout(teacher, z_t, torch.tensor(0.003), 0.002,
                        generators=[keyed_generator("k", 0, i) for i in range(2)], **kw)
    # tolerance: float64 differences of grid times: approx default rel 1e-6 (exact up to a few ulp)
    assert roll.times[:, 0].tolist() == pytest.approx([0.003, 0.001, 1e-5, 1e-5])
    z_t, t, _ = _setup(b=2, seed=3)
    a = sdtt_targets(SpyTeacher(), z_t, t, 0.2, generators=[keyed_generator("k", 0, i) for i in range(2)], **kw)
    b = sdtt_targets(SpyTeacher(), z_t, t, 0.2, generators=[keyed_generator("k", 0, i) for i in range(2)], **kw)
    c = sdtt_targets(SpyTeacher(), z_t, t, 0.2, generators=[keyed_generator("k", 1, i) for i in range(2)], **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # a sample's targets do not depend on its batch neighbour
    solo = sdtt_targets(SpyTeacher(), z_t[:1], t[:1], 0.2, generators=[keyed_generator("k", 0, 0)], **kw)
    assert torch.equal(solo[0], a[0])


def test_sdtt_loss_matches_explicit_sums():
    g = torch.Generator().manual_seed(4)
    b, l = 2, 5
    z_t = torch.tensor([[V, 3, V, V, 1], [0, V, 2, V, V]])
    student = torch.randn(b, l, PADDED, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.log_softmax(torch.randn(b, l, V, generator=g, dtype=torch.float64), -1)
    loss, stats = sdtt_loss(student, z_t, target, V)
    want = 0.0
    for i in range(b):
        for j in range(l):
            if z_t[i, j] != V:
                continue
            row = [math.exp(float(student.detach()[i, j, v])) for v in range(V)]
            p_s = [r / sum(row) for r in row]
            want += sum(p_s[v] * (math.log(p_s[v]) - float(target[i, j, v])) for v in range(V))
    assert math.isclose(float(loss.detach()), want / (b * l), rel_tol=1e-12)
    assert int(stats["n_masked"]) == 6
    loss.backward()
    assert torch.all(student.grad[z_t != V] == 0) and torch.isfinite(student.grad).all()


def test_argument_errors():
    z_t, t, gens = _setup(b=2)
    kw = dict(schedule=get_schedule("loglinear"), vocab_size=V)
    with pytest.raises(ValueError, match="one generator per sample"):
        sdtt_targets(SpyTeacher(), z_t, t, 0.1, generators=gens[:1], **kw)
    with pytest.raises(ValueError, match="n_steps"):
        sdtt_targets(SpyTeacher(), z_t, t, 0.1, generators=gens, n_steps=0, **kw)
    with pytest.raises(ValueError, match="mask_id"):
        sdtt_targets(SpyTeacher(), z_t, t, 0.1, generators=gens, mask_id=0, **kw)
