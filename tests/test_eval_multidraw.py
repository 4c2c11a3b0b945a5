"""Fitting a network to per-token targets (mcd_scale/eval/multidraw.py), on a tiny hand-made model."""
from __future__ import annotations

import math

import pytest
import torch

from mcd_scale.diffusion.schedules import LogLinear
from mcd_scale.eval.multidraw import (TargetSet, forward_states, load_targets, save_targets, target_cross_entropy,
                                     train_on_targets)

V, L = 5, 6


class PerPosition(torch.nn.Module):
    """logits = a free table per position (enough to represent any per-position target)."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(L, V + 1))

    def forward(self, z, t):
        return self.table.expand(z.shape[0], L, V + 1)


def _targets(n: int, seed: int) -> TargetSet:
    g = torch.Generator().manual_seed(0)            # the same target law for train and val
    logq = torch.log_softmax(3 * torch.randn(L, V, generator=g), -1).expand(n, L, V).clone()
    z = torch.full((n, L), V)
    return TargetSet(z, torch.ones(n), logq)


def test_training_reaches_the_targets_entropy_and_keeps_the_best_epoch():
    train, val = _targets(32, 1), _targets(8, 2)
    model = PerPosition()
    idx = torch.arange(8)
    floor = float(-(val.logq.exp() * val.logq).sum(-1).mean())   # CE onto q is minimised at q: its entropy
    before = float(target_cross_entropy(model(val.z, val.t), val, idx, V))
    fit = train_on_targets(model, train, val, V, lr=0.1, batch=8, max_epochs=60, patience=5)
    after = float(target_cross_entropy(model(val.z, val.t), val, idx, V))
    assert before > floor + 0.3
    # tolerance: 60 epochs of Adam on a convex per-position problem get within 0.02 nats of the optimum
    assert after < floor + 0.02 and abs(after - fit["best_val_ce"]) < 1e-6


def test_unmasked_positions_do_not_count():
    t = _targets(4, 0)
    model = PerPosition()
    full = float(target_cross_entropy(model(t.z, t.t), t, torch.arange(4), V))
    t.z[:, :3] = 0                                   # revealed: their (arbitrary) targets must be ignored
    t.logq[:, :3] = 0.0
    half = float(target_cross_entropy(model(t.z, t.t), t, torch.arange(4), V))
    assert abs(half - full) < 1e-5                    # uniform model: CE log V at every masked position either way


def test_forward_states_mask_at_the_schedules_rate_and_cover_every_step():
    x = torch.zeros(64, 400, dtype=torch.long)
    z, t = forward_states(x, 4, LogLinear(), V, seed=0, split="train")
    alpha = LogLinear().alpha(t.double())
    frac = (z == V).double().mean(1)
    # tolerance: 400 Bernoulli draws per row, sd <= 0.025
    assert (frac - (1 - alpha)).abs().max() < 0.1
    assert len(torch.unique(t)) == 4
    z2, _ = forward_states(x, 4, LogLinear(), V, seed=0, split="train")
    z3, _ = forward_states(x, 4, LogLinear(), V, seed=0, split="val")
    assert torch.equal(z, z2) and not torch.equal(z, z3)


def test_reported_kl_is_ce_minus_the_targets_entropy_and_falls_to_zero():
    train, val = _targets(32, 1), _targets(8, 2)
    model = PerPosition()
    # independent reference: KL(q || uniform) = log V - H(q) for the untrained (uniform) model
    h = float(-(val.logq.exp() * val.logq).sum(-1).mean())
    fit = train_on_targets(model, train, val, V, lr=0.1, batch=8, max_epochs=60, patience=5)
    assert abs(fit["val_target_entropy"] - h) < 1e-5
    assert abs(fit["val_kl_start"] - (math.log(V) - h)) < 1e-4
    assert 0 <= fit["best_val_kl"] < 0.02


def test_targets_cache_round_trips_and_refuses_other_settings(tmp_path):
    t = _targets(4, 0)
    path = str(tmp_path / "targets.train.safetensors")
    save_targets(path, t, {"draws": 8, "states": 4})
    back = load_targets(path, {"draws": 8, "states": 4})
    assert torch.equal(back.z, t.z) and torch.equal(back.t, t.t) and torch.equal(back.logq, t.logq)
    with pytest.raises(ValueError, match="draws=8.*16"):
        load_targets(path, {"draws": 16, "states": 4})
