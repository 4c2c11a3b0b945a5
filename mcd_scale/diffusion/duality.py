"""The Gaussian–masked duality and deterministic coupled trajectories (docs/method.md §3–4).

Gaussian latent per token, noise drawn ONCE and shared by all t:  w_t = a_t onehot(x) + s_t eps,
eps ~ N(0, I_K). Projection (max-value index): z_t = x iff w_t[x] > max_{j!=x} w_t[j]
  <=>  r_t = a_t / s_t > Y := max_{j!=x} eps_j - eps_x      (Y does not depend on t).
So each token has one masking time and the path is monotone (absorbing). Calibration:
  F(r) = P(Y < r) = ∫ phi(z - r) Phi(z)^(K-1) dz,   r_t = F^{-1}(alpha_t)
gives exactly the MDLM law, and u = F(Y) ~ U(0,1): the uniform-threshold form reveals iff u < alpha_t.

Every form here returns thresholds on the same u-scale, so a coupled pair is always
``z_t = where(u < alpha_t, x, m)``. (The law does not depend on K; only the r_t values do. The
reference values in docs/method.md use K = 50258, i.e. GPT-2's 50257 tokens plus the mask.)
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np
import torch
from scipy.interpolate import PchipInterpolator

from mcd_scale.diffusion.schedules import Schedule
from mcd_scale.rng import keyed_generator

ALPHA_CLIP = 1e-6  # F(0) = 1/K: alpha is clipped to [1e-6, 1 - 1e-6] before inversion
_Z_STEP = 0.005  # quadrature spacing; the trapezoid rule is spectrally accurate for this smooth integrand
_EXPLICIT_MAX_K = 4096  # the explicit K-dim form materialises [B, L, K]: tests only


# --------------------------------------------------------------------------------------------
# Calibration F and its inverse
# --------------------------------------------------------------------------------------------
def calibration_cdf_exact(r: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
    """(F(r), 1 - F(r)) by trapezoidal quadrature in float64; both tails computed directly.

    F(r) = ∫ phi(z - r) Phi(z)^(K-1) dz; 1 - F(r) = ∫ phi(z - r) (1 - Phi(z)^(K-1)) dz (no cancellation).
    """
    if K < 2:
        raise ValueError(f"K (the Gaussian's dimension) must be >= 2, got {K}")
    r = np.atleast_1d(np.asarray(r, dtype=np.float64))
    z = np.arange(r.min() - 10.0, r.max() + 10.0 + _Z_STEP, _Z_STEP)
    log_cdf_max = (K - 1) * torch.special.log_ndtr(torch.from_numpy(z)).numpy()  # log Phi(z)^(K-1)
    upper = -np.expm1(log_cdf_max)  # 1 - Phi(z)^(K-1), accurate when it is tiny
    F, G = np.empty_like(r), np.empty_like(r)
    for lo in range(0, r.size, 256):  # blocks keep the [n_r, n_z] matrix small
        rb = r[lo:lo + 256, None]
        log_phi = -0.5 * (z[None, :] - rb) ** 2 - 0.5 * math.log(2 * math.pi)
        F[lo:lo + 256] = np.exp(log_phi + log_cdf_max[None, :]).sum(1) * _Z_STEP
        G[lo:lo + 256] = (np.exp(log_phi) * upper[None, :]).sum(1) * _Z_STEP
    return F, G


class Calibration:
    """F and F^{-1} for one K: exact quadrature on a grid, then monotone (PCHIP) interpolation of
    logit F against r, which is smooth and nearly linear in both tails."""

    def __init__(self, K: int, n_grid: int = 2001):
        self.K = int(K)
        lo, hi = -10.0, math.sqrt(2 * math.log(K)) + 10.0  # F(lo) < 1e-12 and 1 - F(hi) < 1e-12 for all K >= 2
        r = np.linspace(lo, hi, n_grid)
        F, G = calibration_cdf_exact(r, K)
        keep = (F > 1e-15) & (G > 1e-15)  # drop points where a tail underflows
        self.r_grid = r[keep]
        self.logit_grid = np.log(F[keep]) - np.log(G[keep])
        if not np.all(np.diff(self.logit_grid) > 0):
            raise RuntimeError(f"calibration for K={K} is not strictly increasing: quadrature failed")
        self._fwd = PchipInterpolator(self.r_grid, self.logit_grid, extrapolate=True)
        self._inv = PchipInterpolator(self.logit_grid, self.r_grid, extrapolate=True)

    def cdf(self, r) -> np.ndarray:
        """F(r) = P(Y < r), float64."""
        return _sigmoid(self._fwd(np.asarray(r, dtype=np.float64)))

    def inverse(self, alpha) -> np.ndarray:
        """r with F(r) = alpha, alpha clipped to [1e-6, 1 - 1e-6]."""
        a = np.clip(np.asarray(alpha, dtype=np.float64), ALPHA_CLIP, 1 - ALPHA_CLIP)
        return self._inv(np.log(a) - np.log1p(-a))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


@functools.lru_cache(maxsize=16)
def get_calibration(K: int) -> Calibration:
    """The cached :class:`Calibration` for K (built once per process, ~0.3 s)."""
    return Calibration(K)


def F(r, K: int) -> np.ndarray:
    """Calibration F(r) = P(max_{j!=x} eps_j - eps_x < r) for K-dim standard Gaussian noise."""
    return get_calibration(K).cdf(r)


def F_inv(alpha, K: int) -> np.ndarray:
    """r = F^{-1}(alpha) with alpha clipped to [1e-6, 1 - 1e-6]."""
    return get_calibration(K).inverse(alpha)


def r_of_t(t: torch.Tensor, schedule: Schedule, K: int) -> torch.Tensor:
    """Signal-to-noise ratio r_t = a_t / s_t = F^{-1}(alpha_t) (float64, decreasing in t)."""
    alpha = schedule.alpha(t.to(torch.float64)).cpu().numpy()
    return torch.from_numpy(np.asarray(F_inv(alpha, K), dtype=np.float64)).reshape(t.shape)


# --------------------------------------------------------------------------------------------
# The Gaussian latent: explicit (small K) and cheap exact forms
# --------------------------------------------------------------------------------------------
def gaussian_latent(x: torch.Tensor, eps: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """w_t = a onehot(x) + s eps with a = r / sqrt(1 + r^2), s = 1 / sqrt(1 + r^2) (variance preserving;
    only the ratio a/s = r matters to the projection). x [..], eps [.., K], r broadcastable to x."""
    r = torch.as_tensor(r, dtype=torch.float64)
    a = (r / torch.sqrt(1 + r * r)).unsqueeze(-1)
    s = (1 / torch.sqrt(1 + r * r)).unsqueeze(-1)
    onehot = torch.nn.functional.one_hot(x, eps.shape[-1]).to(torch.float64)
    return a * onehot + s * eps


def project_max_index(w: torch.Tensor, x: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Maximum-value index projection: z = x where w[x] is the strict maximum of w, else the mask."""
    w_x = w.gather(-1, x.unsqueeze(-1)).squeeze(-1)
    others = w.scatter(-1, x.unsqueeze(-1), float("-inf")).max(-1).values
    return torch.where(w_x > others, x, torch.full_like(x, mask_id))


def gap_from_explicit(eps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Y = max_{j!=x} eps_j - eps_x from explicit K-dim noise eps [.., K]."""
    eps_x = eps.gather(-1, x.unsqueeze(-1)).squeeze(-1)
    return eps.scatter(-1, x.unsqueeze(-1), float("-inf")).max(-1).values - eps_x


def gap_cheap(shape, K: int, generator: torch.Generator) -> torch.Tensor:
    """Y with the exact law of the explicit form, from two numbers per token (float64):
    eps_x ~ N(0,1) and max_{j!=x} eps_j = Phi^{-1}(v^(1/(K-1))), v ~ U(0,1).

    v^(1/(K-1)) is within ~1/K of 1, where Phi^{-1} loses digits; by symmetry we use
    Phi^{-1}(p) = -Phi^{-1}(1 - p) with 1 - p = -expm1(log(v) / (K-1)) computed without cancellation.
    """
    eps_x = torch.randn(shape, generator=generator, dtype=torch.float64)
    v = torch.rand(shape, generator=generator, dtype=torch.float64).clamp_min(torch.finfo(torch.float64).tiny)
    max_other = -torch.special.ndtri(-torch.expm1(torch.log(v) / (K - 1)))
    return max_other - eps_x


def gap_to_threshold(Y: torch.Tensor, K: int) -> torch.Tensor:
    """u = F(Y) ~ U(0,1): the Gaussian gap on the common u-scale (float64)."""
    return torch.from_numpy(np.asarray(F(Y.cpu().numpy(), K), dtype=np.float64)).reshape(Y.shape)


# --------------------------------------------------------------------------------------------
# Coupled trajectories
# --------------------------------------------------------------------------------------------
FORMS = ("uniform", "gaussian", "gaussian_explicit")


def reveal_thresholds(sample_ids: torch.Tensor, seq_len: int, seed: int, form: str = "uniform",
                      K: Optional[int] = None, round_idx: Optional[int] = None) -> torch.Tensor:
    """Per-token thresholds u in (0,1) (float64 [B, L]); a token is revealed at t iff u < alpha_t.

    Row b comes from ``keyed_generator("coupled", seed, sample_ids[b])`` (plus ``round_idx`` when given),
    so it is the same on any rank and in any batch. Forms: 'uniform' (u ~ U(0,1) directly, the fast
    path), 'gaussian' (cheap exact Gaussian gap Y mapped by F), 'gaussian_explicit' (K-dim noise with
    x = 0, small K only; the law of Y does not depend on which index is x).
    """
    if form not in FORMS:
        raise ValueError(f"unknown threshold form {form!r}; use one of {FORMS}")
    if form != "uniform" and (K is None or K < 2):
        raise ValueError(f"form {form!r} needs the Gaussian dimension K >= 2, got {K}")
    if form == "gaussian_explicit" and K > _EXPLICIT_MAX_K:
        raise ValueError(f"'gaussian_explicit' materialises K={K} numbers per token; use 'gaussian' "
                         f"(same law) for K > {_EXPLICIT_MAX_K}")
    rows = []
    for sid in sample_ids.tolist():
        ids = (seed, int(sid)) if round_idx is None else (seed, int(sid), int(round_idx))
        gen = keyed_generator("coupled", *ids)
        if form == "uniform":
            rows.append(torch.rand(seq_len, generator=gen, dtype=torch.float64))
        elif form == "gaussian":
            rows.append(gap_cheap((seq_len,), K, gen))
        else:
            eps = torch.randn(seq_len, K, generator=gen, dtype=torch.float64)
            rows.append(gap_from_explicit(eps, torch.zeros(seq_len, dtype=torch.long)))
    if not rows:
        return torch.empty(0, seq_len, dtype=torch.float64)
    out = torch.stack(rows)
    return out if form == "uniform" else gap_to_threshold(out, K)


def coupled_pair(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, u: torch.Tensor, schedule: Schedule,
                 mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_t, z_s) from one set of thresholds: z = where(u < alpha, x, m). For s <= t (per sample [B])
    alpha_s >= alpha_t, so every token masked in z_s is masked in z_t (nesting by construction)."""
    if bool((s > t).any()):
        raise ValueError("coupled_pair needs s <= t for every sample (s is the cleaner time)")
    a_t = schedule.alpha(t.to(torch.float64)).unsqueeze(1).to(u.device)
    a_s = schedule.alpha(s.to(torch.float64)).unsqueeze(1).to(u.device)
    m = torch.full_like(x, mask_id)
    return torch.where(u < a_t, x, m), torch.where(u < a_s, x, m)


def masking_times(u: torch.Tensor, schedule: Schedule, iters: int = 60) -> torch.Tensor:
    """The time tau at which each token gets masked (alpha_tau = u), by vectorised bisection on the
    decreasing alpha; 0 if u >= alpha_0 (masked from the start), 1 if u < alpha_1 (never masked)."""
    lo = torch.zeros_like(u, dtype=torch.float64)
    hi = torch.ones_like(u, dtype=torch.float64)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        revealed = u < schedule.alpha(mid)
        lo = torch.where(revealed, mid, lo)
        hi = torch.where(revealed, hi, mid)
    return hi
