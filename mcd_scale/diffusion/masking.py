"""The MDLM forward process on the data side: diffusion times and independent per-token masking.

Both functions are pure functions of (seed, step, global ids): a sample gets the same t and the same
mask whatever rank, micro-batch or data-parallel layout it lands in (docs/method.md §2, §4), so a resumed or
re-sharded run reproduces the same corruption bit for bit.
"""
from __future__ import annotations

import torch

from mcd_scale.diffusion.schedules import Schedule
from mcd_scale.rng import keyed_generator


def sample_times(positions: torch.Tensor, global_batch: int, step: int, seed: int, t_min: float = 1e-3,
                 antithetic: bool = True) -> torch.Tensor:
    """Diffusion times t in [t_min, 1] for the samples at ``positions`` of a global batch (float32 [B]).

    Antithetic (stratified over the whole global batch, as MDLM does): one offset ``o ~ U(0,1)`` per
    (seed, step) from ``keyed_generator("time", seed, step)``, ``u_j = (o + j / G) mod 1`` for global
    position ``j`` of ``G``, and ``t = (1 - t_min) u + t_min``. Every rank computes only its own positions
    but the set of t's over the global batch is one stratified grid, whatever the DP layout.
    Non-antithetic: one independent draw per (seed, step, position).

    positions: LongTensor [B] of global-batch positions in [0, global_batch).
    """
    if positions.dim() != 1:
        raise ValueError(f"positions must be 1-D [B], got shape {tuple(positions.shape)}")
    if global_batch <= 0:
        raise ValueError(f"global_batch must be positive, got {global_batch}")
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= global_batch):
        raise ValueError(f"positions must lie in [0, {global_batch}), got range "
                         f"[{int(positions.min())}, {int(positions.max())}]")
    if not 0.0 < t_min < 1.0:
        raise ValueError(f"t_min must be in (0, 1), got {t_min}")
    pos = positions.to(torch.float64)
    if antithetic:
        offset = torch.rand((), generator=keyed_generator("time", seed, step), dtype=torch.float64)
        u = torch.remainder(offset + pos / global_batch, 1.0)
    else:
        u = torch.stack([torch.rand((), generator=keyed_generator("time", seed, step, int(p)), dtype=torch.float64)
                         for p in positions.tolist()]) if positions.numel() else pos.clone()
    # Computed in float64 so the stratification survives before the final cast.
    return ((1.0 - t_min) * u + t_min).to(torch.float32)


def mask_uniforms(sample_ids: torch.Tensor, seq_len: int, step: int, seed: int) -> torch.Tensor:
    """The per-token U(0,1) draws of :func:`mask_tokens` (float64 [B, L]); exposed for tests/auditing.

    Row b comes from ``keyed_generator("mdlm-mask", seed, sample_ids[b], step)``: fresh at every step
    (the MDLM teacher's noise is NOT coupled across steps; coupling is duality.py's business).
    """
    rows = [torch.rand(seq_len, generator=keyed_generator("mdlm-mask", seed, int(i), step), dtype=torch.float64)
            for i in sample_ids.tolist()]
    return torch.stack(rows) if rows else torch.empty(0, seq_len, dtype=torch.float64)


def mask_tokens(x: torch.Tensor, t: torch.Tensor, sample_ids: torch.Tensor, step: int, seed: int,
                schedule: Schedule, mask_id: int) -> torch.Tensor:
    """z_t: each token of ``x`` independently kept with probability alpha_t, else replaced by ``mask_id``.

    x: LongTensor [B, L]; t: [B]; sample_ids: LongTensor [B] (global dataset ids, the RNG key).
    A token is revealed iff its uniform draw u < alpha_t (so P(revealed) = alpha_t exactly).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [B, L], got shape {tuple(x.shape)}")
    if t.shape != (x.shape[0],) or sample_ids.shape != (x.shape[0],):
        raise ValueError(f"t and sample_ids must be [B={x.shape[0]}], got {tuple(t.shape)} and "
                         f"{tuple(sample_ids.shape)}")
    u = mask_uniforms(sample_ids, x.shape[1], step, seed).to(x.device)
    alpha = schedule.alpha(t.to(torch.float64)).to(x.device)
    return torch.where(u < alpha.unsqueeze(1), x, torch.full_like(x, mask_id))
