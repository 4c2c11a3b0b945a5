"""The greedy last step (docs/method.md section 7): the final step t_{N-1} -> t_N takes argmax p, earlier steps are
untouched, and the share of argmax tokens matches the schedule's last-step reveal mass."""
from __future__ import annotations

import math

import pytest
import torch

from mcd_scale.diffusion.sampling import ancestral_sample, coupled_sample, reveal_thresholds, sampling_times
from mcd_scale.diffusion.schedules import get_schedule

V, L = 8, 48


def _logits() -> torch.Tensor:
    """Fixed per-position logits (independent of z), close to flat so a draw is rarely the argmax."""
    g = torch.Generator().manual_seed(5)
    return 0.3 * torch.randn(L, V + 1, generator=g, dtype=torch.float64)


def _denoiser(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return _logits().float().unsqueeze(0).expand(z.shape[0], L, V + 1)


@pytest.mark.parametrize("steps", [4, 16])
def test_coupled_last_step_is_argmax_and_earlier_steps_unchanged(steps):
    sched = get_schedule("loglinear", 1e-3)
    n = 8
    base = coupled_sample(_denoiser, n, L, steps, V, sched, seed=3).tokens
    greedy = coupled_sample(_denoiser, n, L, steps, V, sched, seed=3, greedy_last_step=True).tokens
    argmax = _logits()[:, :V].argmax(-1)
    a_prev = float(sched.alpha(sampling_times(steps))[-2])
    last = torch.stack([reveal_thresholds("random", 3, i, L, sched, steps) >= a_prev for i in range(n)])
    assert last.any() and (~last).any()
    assert torch.equal(greedy[last], argmax.expand(n, L)[last])        # the final step's reveals: argmax
    assert torch.equal(greedy[~last], base[~last])                     # every earlier reveal: unchanged
    assert (base[last] != argmax.expand(n, L)[last]).any()             # and the default draws them


def test_ancestral_argmax_share_matches_the_last_step_reveal_mass():
    """With z-independent logits the reveal draws of both runs coincide; a token is argmax with
    probability p_max (sampled) or 1 (revealed at the last step, mass (alpha_N - alpha_{N-1}) / alpha_N)."""
    sched = get_schedule("loglinear", 1e-3)
    steps, n = 4, 192
    base = ancestral_sample(_denoiser, n, L, steps, V, sched, seed=1).tokens
    greedy = ancestral_sample(_denoiser, n, L, steps, V, sched, seed=1, greedy_last_step=True).tokens
    logp = torch.log_softmax(_logits()[:, :V], -1)
    argmax, p_max = logp.argmax(-1), logp.max(-1).values.exp()
    changed = greedy != base
    assert changed.any() and torch.equal(greedy[changed], argmax.expand(n, L)[changed])
    alphas = sched.alpha(sampling_times(steps))
    # Still masked at t_{N-1} (then revealed by the last step or the greedy tail): (1 - alpha_{N-1}) / (1 - alpha_0).
    share = float((1 - alphas[-2]) / (1 - alphas[0]))
    expect = (share + (1 - share) * p_max).mean().item()
    got = (greedy == argmax).double().mean().item()
    se = math.sqrt(expect * (1 - expect) / (n * L))
    assert abs(got - expect) < 5 * se, (got, expect, se)
    base_share = (base == argmax).double().mean().item()
    assert got - base_share > 10 * se  # measurably more argmax tokens than the default sampler
