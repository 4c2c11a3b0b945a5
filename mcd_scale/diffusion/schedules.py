"""Masking schedules alpha_t: the probability that a token is still revealed at time t.

t = 0 is clean, t = 1 fully masked. alpha is decreasing; ``weight(t) = -alpha'(t) / (1 - alpha(t))``
is the continuous-time NELBO weight (~1/t for log-linear).
"""
from __future__ import annotations

import math

import torch


class Schedule:
    name = "base"

    def __init__(self, eps: float = 1e-3):
        self.eps = float(eps)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha'(t) / (1 - alpha(t)), the NELBO weight of a masked token's cross-entropy."""
        return -self.dalpha(t) / (1.0 - self.alpha(t))


class LogLinear(Schedule):
    """alpha_t = 1 - (1 - eps) t (MDLM's log-linear noise: sigma_t = -log(1 - (1-eps) t))."""
    name = "loglinear"

    def alpha(self, t):
        return 1.0 - (1.0 - self.eps) * t

    def dalpha(self, t):
        return torch.full_like(t, -(1.0 - self.eps)) if torch.is_tensor(t) else -(1.0 - self.eps)


class Cosine(Schedule):
    """alpha_t = eps + (1 - eps) cos(pi t / 2)."""
    name = "cosine"

    def alpha(self, t):
        return self.eps + (1.0 - self.eps) * torch.cos(0.5 * math.pi * t)

    def dalpha(self, t):
        return -(1.0 - self.eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * t)


def get_schedule(name: str, eps: float = 1e-3) -> Schedule:
    table = {"loglinear": LogLinear, "cosine": Cosine}
    if name not in table:
        raise ValueError(f"unknown schedule {name!r}; use one of {sorted(table)} (config 'diffusion.schedule')")
    return table[name](eps)
