"""The population optimum of the distillation losses for one token: what a perfect student would predict.

Given z_t, draw K coupled continuations (x ~ p(x | z_t), z_s from the coupling) and look at one position
masked at t. Across the draws it is either revealed at s with value x^k (the MCD loss puts CE there) or
still masked, where the teacher predicts p_T(. | z_s^k). The expected MCD loss over the draws, as a
function of the student's distribution q over V symbols, is (weights per draw, summed):

    F(q) = - sum_v n_v log q_v + sum_{k masked} D(q, p_k)

with n_v the (weighted) count of draws revealing v. It is convex in q, so its minimiser is the
population optimum (docs/method.md section 5, docs/distill.md "What the MCD loss converges to"):

- forward KL, D = KL(p_k || q): q = (n + sum_k p_k) / (sum n + m), the mixture: the teacher's marginal;
- reverse KL, D = KL(q || p_k): stationarity -n_v / q_v + m (log q_v + 1) - G_v + lambda = 0 with
  m = number of masked draws and G = sum_k log p_k. With n = 0 this is the normalised geometric mean
  q ∝ exp(G / m); with m = 0 the empirical law n / sum n; in between, for a given lambda each y_v = log q_v
  has the closed form y_v = b_v + W((n_v / m) e^{-b_v}), b_v = (G_v - lambda - m) / m, with W the Lambert W
  function (solved by Newton's method in log space: a few iterations to float64 precision), and lambda is
  found by bisection (sum_v q_v is decreasing in lambda). Measured: the nested bisection this replaced
  (50 x 50 steps) was 68% of an ideal-row sample's time at L = 256.
- SDTT (reverse KL to the target of each draw, no CE part): q ∝ exp(mean_k log target_k).

Everything is float64 and batched over leading dimensions.
"""
from __future__ import annotations

import torch

_LOG_FLOOR = -1e4  # a teacher log-probability of -inf (a point mass elsewhere) is clamped here


def _lambert_w_of_exp(a: torch.Tensor, iters: int = 8) -> torch.Tensor:
    """W(e^a) (the w > 0 with w + log w = a) for finite float64 ``a``, overflow-free for large ``a``: Newton's
    method on h(l) = e^l + l - a in l = log w (convex and increasing, so from a start at or right of the root
    it converges monotonically and quadratically). Start: l = a for a <= 1 (W(e^a) <= e^a there), else
    l = log(a - log a) (within ~0.2 of the root, so one step lands to its right)."""
    big = a > 1.0
    ell = torch.where(big, torch.log((a - torch.log(a.clamp(min=1.0))).clamp(min=1e-300)), a)
    for _ in range(iters):
        e = torch.exp(ell)
        ell = ell - (e + ell - a) / (e + 1.0)
    return torch.exp(ell)


def forward_kl_optimum(counts: torch.Tensor, teacher_logp: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """log q of the forward-KL optimum. counts [..., V] (n_v), teacher_logp [..., K, V] (log p_k),
    masked [..., K] bool (which draws leave the token masked at s; other draws' teacher rows are ignored)."""
    mix = (teacher_logp.double().exp() * masked.double().unsqueeze(-1)).sum(-2)
    total = counts.double() + mix
    return torch.log(total / total.sum(-1, keepdim=True))


def sdtt_optimum(target_logp: torch.Tensor) -> torch.Tensor:
    """log q of the SDTT optimum: the normalised geometric mean of the K targets [..., K, V]."""
    g = target_logp.double().clamp(min=_LOG_FLOOR).mean(-2)
    return torch.log_softmax(g, -1)


def reverse_kl_optimum(counts: torch.Tensor, teacher_logp: torch.Tensor, masked: torch.Tensor,
                       iters: int = 100) -> torch.Tensor:
    """log q of the reverse-KL MCD optimum (see the module docstring); shapes as in forward_kl_optimum."""
    n = counts.double()
    mk = masked.double()
    m = mk.sum(-1, keepdim=True)                                              # [..., 1]
    G = (teacher_logp.double().clamp(min=_LOG_FLOOR) * mk.unsqueeze(-1)).sum(-2)  # [..., V]
    emp = torch.log(n / n.sum(-1, keepdim=True).clamp(min=1e-300))
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")

    # m is a (weighted) count and may be fractional; rows with m = 0 take the empirical law below, and any
    # positive stand-in keeps them finite here.
    ms = torch.where(m > 0, m, torch.ones_like(m))
    geo = torch.log_softmax(G / ms, -1)
    has_n = n > 0
    log_n_over_m = torch.where(has_n, torch.log(n.clamp(min=1e-300) / ms), torch.zeros_like(n))

    def log_q(lam: torch.Tensor) -> torch.Tensor:
        # Solve m y - n_v e^{-y} = G_v - lam - m for y = log q_v: y = b + W((n_v / m) e^{-b}), b = (G_v - lam - m) / m.
        b = (G - lam - m) / ms
        return b + torch.where(has_n, _lambert_w_of_exp(log_n_over_m - b), torch.zeros_like(b))

    # lambda brackets: sum_v q_v(lam) is decreasing in lam; widen until it brackets 1.
    lam_lo = torch.full_like(m, -1.0)
    lam_hi = torch.full_like(m, 1.0)
    for _ in range(60):
        s = torch.logsumexp(log_q(lam_lo), -1, keepdim=True)
        if bool((s > 0).all()):
            break
        lam_lo = torch.where(s > 0, lam_lo, lam_lo * 2.0)
    for _ in range(60):
        s = torch.logsumexp(log_q(lam_hi), -1, keepdim=True)
        if bool((s < 0).all()):
            break
        lam_hi = torch.where(s < 0, lam_hi, lam_hi * 2.0)
    for _ in range(iters):
        mid = 0.5 * (lam_lo + lam_hi)
        s = torch.logsumexp(log_q(mid), -1, keepdim=True)
        lam_lo = torch.where(s > 0, mid, lam_lo)
        lam_hi = torch.where(s > 0, lam_hi, mid)
    mixed = torch.log_softmax(log_q(0.5 * (lam_lo + lam_hi)), -1)
    no_ce = n.sum(-1, keepdim=True) == 0
    no_kl = m == 0
    return torch.where(no_ce, geo, torch.where(no_kl, emp, mixed))
