"""Forward process: antithetic times over the global batch and independent per-token masking."""
import math

import torch

from mcd_scale.diffusion.masking import mask_tokens, mask_uniforms, sample_times
from mcd_scale.diffusion.schedules import get_schedule
from mcd_scale.rng import keyed_generator

T_MIN = 1e-3


def test_antithetic_times_are_one_stratified_grid():
    G = 64
    t32 = sample_times(torch.arange(G), G, step=7, seed=3, t_min=T_MIN)
    assert t32.dtype == torch.float32 and t32.shape == (G,)
    t = t32.double()
    assert t.min() >= T_MIN and t.max() <= 1.0
    u = (t - T_MIN) / (1 - T_MIN)
    # Independent recomputation of the offset: u_j - j/G must be one constant (mod 1).
    offset = torch.rand((), generator=keyed_generator("time", 3, 7), dtype=torch.float64)
    shifted = torch.remainder(u - torch.arange(G, dtype=torch.float64) / G - offset + 0.5, 1.0) - 0.5
    # tolerance: t is float32 (u recovered from it has relative error ~6e-8, x 1/(1 - t_min)); 1e-6 = ~16 ulp
    assert shifted.abs().max() < 1e-6
    # Stratified: exactly one u in each [k/G, (k+1)/G).
    counts = torch.bincount((u * G).floor().long().clamp(max=G - 1), minlength=G)
    assert torch.equal(counts, torch.ones(G, dtype=torch.long))


def test_times_same_set_for_dp1_and_dp2():
    G = 32
    whole = sample_times(torch.arange(G), G, step=11, seed=5)
    # dp=2, contiguous slicing and interleaved slicing: each rank only knows its own positions.
    for slices in ([torch.arange(0, 16), torch.arange(16, 32)], [torch.arange(0, G, 2), torch.arange(1, G, 2)]):
        parts = [sample_times(p, G, step=11, seed=5) for p in slices]
        assert torch.equal(torch.cat(parts).sort().values, whole.sort().values)
        for p, part in zip(slices, parts):
            assert torch.equal(part, whole[p])


def test_times_change_with_step_and_non_antithetic_is_uniform():
    G = 4000
    a = sample_times(torch.arange(8), 8, step=0, seed=1)
    b = sample_times(torch.arange(8), 8, step=1, seed=1)
    assert not torch.equal(a, b)
    t = sample_times(torch.arange(G), G, step=2, seed=1, antithetic=False).double()
    u = (t - T_MIN) / (1 - T_MIN)
    # Mean and variance of U(0,1) within 4 sigma; and NOT stratified (some stratum empty).
    assert abs(u.mean() - 0.5) < 4 * math.sqrt(1 / 12 / G)
    assert abs(u.var() - 1 / 12) < 4 * math.sqrt(1 / 180 / G)
    assert (torch.bincount((u * G).floor().long().clamp(max=G - 1), minlength=G) == 0).any()
    # Per-position keyed: independent of which other positions are asked for.
    assert torch.equal(sample_times(torch.tensor([5, 17]), G, 2, 1, antithetic=False), t[[5, 17]].float())


def test_mask_rate_matches_alpha_and_reveals_keep_tokens():
    sched = get_schedule("cosine")
    B, L, V = 6, 4000, 100
    x = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.97])
    z = mask_tokens(x, t, torch.arange(100, 100 + B), step=3, seed=9, schedule=sched, mask_id=V)
    revealed = z != V
    assert torch.equal(z[revealed], x[revealed])
    alpha = sched.alpha(t.double())
    rate = revealed.double().mean(1)
    sigma = torch.sqrt(alpha * (1 - alpha) / L)
    assert ((rate - alpha).abs() < 4 * sigma + 1e-12).all(), (rate, alpha)


def test_mask_is_keyed_by_sample_not_batch():
    sched = get_schedule("loglinear")
    V, L = 50, 64
    x = torch.randint(0, V, (4, L), generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([10, 11, 12, 13])
    t = torch.full((4,), 0.5)
    z = mask_tokens(x, t, ids, step=2, seed=4, schedule=sched, mask_id=V)
    z_alone = mask_tokens(x[2:3], t[2:3], ids[2:3], step=2, seed=4, schedule=sched, mask_id=V)
    assert torch.equal(z[2:3], z_alone)
    # Rule "revealed iff u < alpha_t" against the exposed uniforms.
    u = mask_uniforms(ids, L, 2, 4)
    assert torch.equal(z != V, u < sched.alpha(torch.tensor(0.5, dtype=torch.float64)))
    # A different step re-draws the mask (MDLM noise is fresh every step).
    assert not torch.equal(z, mask_tokens(x, t, ids, step=3, seed=4, schedule=sched, mask_id=V))
