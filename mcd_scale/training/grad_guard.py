"""Non-finite gradients with a finite loss: detected on the rank that made them, skipped on every rank.

Why a gradient hook and not only the loss guard (mcd_scale/training/engine.py ``guard_nonfinite``): a backward can
produce NaN/Inf from a finite loss (an overflowing matmul, a bad kernel, a bit flip on one device). The
data-parallel reduction then spreads it to every rank, and an optimizer step -- even at lr 0, since
``p - 0 * NaN`` is NaN -- writes NaN into the weights and Adam's moments, which the next checkpoint saves.

A tensor hook on every trainable parameter runs on this rank's local gradient before DeepSpeed accumulates,
reduces or partitions it (tensor hooks precede the AccumulateGrad node that ZeRO hooks onto), so it works
for ZeRO 0-3 alike. It records a device flag (no host read) and replaces a non-finite gradient by zeros, so
nothing non-finite reaches the reduction or the optimizer. The engine adds the flag to the step's one
collective: every rank skips the same step and the trainer counts it like a non-finite loss.
"""
from __future__ import annotations

from typing import Iterable

import torch


class GradFiniteGuard:
    def __init__(self, params: Iterable[torch.nn.Parameter], device: torch.device):
        self.device = device
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.handles = [p.register_hook(self._hook) for p in params if p.requires_grad]

    def _hook(self, grad: torch.Tensor) -> torch.Tensor:
        # One read for the check, one read/write for the replacement: the sum is non-finite iff some element is
        # (NaN and +-Inf propagate; inf - inf is NaN), or the finite gradient's sum overflows, itself a gradient
        # to skip. ``isfinite(grad).all()`` + ``where(ok, grad, zeros_like(grad))`` took ~6 passes over every
        # gradient (tools/bench/train_overhead.py profile, docs/performance.md).
        ok = torch.isfinite(grad.sum())
        self.bad = self.bad | ~ok.to(self.device)
        return torch.where(ok, grad, 0.0)

    def reset(self) -> None:
        self.bad = torch.zeros((), dtype=torch.bool, device=self.device)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
