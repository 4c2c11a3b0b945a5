"""The reveal order of the coupled trajectories a student is distilled on.

MCD couples (z_t, z_s) through one threshold per token: revealed at time t iff u < alpha_t (docs/method.md §4). With i.i.d.
uniform u ('random') the tokens revealed in (s, t] are scattered at random. The strided coupled sampler
(:func:`mcd_scale.diffusion.sampling.reveal_thresholds`, ``order='strided'``) instead puts the residue classes
j mod stride into separate bands of its ``stride``-step grid, so one grid step reveals exactly one class and no two
tokens closer than ``stride`` in one step. A student sampled that way should learn jumps that reveal tokens in
that order: ``distill.reveal_order: strided`` maps each token's keyed uniform u into the band of its residue class,

    u' = lo + u * (hi - lo),   [lo, hi) = [alpha(t_{c+1}), alpha(t_c)) of ``sampling_times(stride)``,

with the classes' band permutation keyed by (seed, sample id, round). Each u' is uniform within its band, so a
token's reveal time keeps the grid's marginal law and the nesting of z_s in z_t is unchanged (one u' per token).
The same function serves the online objective, the precompute job and the shard reader, so all three agree.
"""
from __future__ import annotations

import torch

from mcd_scale.rng import keyed_generator
from mcd_scale.diffusion.sampling import sampling_times

REVEAL_ORDERS = ("random", "strided")
BAND_PURPOSE = "coupled-strided-bands"  # keyed_generator purpose of the per-sample band permutation


def ordered_thresholds(u: torch.Tensor, sample_ids: torch.Tensor, seed: int, round_idx: int, order: str,
                       stride: int, schedule) -> torch.Tensor:
    """The thresholds of ``order`` (float64 [B, L]) from the keyed uniforms ``u`` [B, L] of these samples."""
    if order == "random":
        return u
    if order != "strided":
        raise ValueError(f"reveal order must be one of {REVEAL_ORDERS}, got {order!r}")
    if stride < 2:
        raise ValueError(f"the strided reveal order needs a stride >= 2, got {stride}")
    B, L = u.shape
    grid = schedule.alpha(sampling_times(stride).to(torch.float64))  # increasing: alpha(1) ~ 0 ... alpha(t_N) ~ 1
    classes = torch.arange(L) % stride
    bands = torch.stack([torch.randperm(stride, generator=keyed_generator(BAND_PURPOSE, seed, int(sid), round_idx))
                         [classes] for sid in sample_ids.reshape(-1).tolist()]) if B else classes.new_empty(0, L)
    lo, hi = grid[bands], grid[bands + 1]
    return lo.to(u.device) + u.double() * (hi - lo).to(u.device)
