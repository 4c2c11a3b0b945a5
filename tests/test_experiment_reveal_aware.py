"""tools/experiments/reveal_aware.py: its sampler copy, cluster ranks and coordinated targets."""
from __future__ import annotations

import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools", "experiments"))
sys.path.insert(0, os.path.join(REPO, "tools"))
import reveal_aware  # noqa: E402

from mcd_scale.diffusion.sampling import ancestral_sample  # noqa: E402
from mcd_scale.diffusion.schedules import get_schedule  # noqa: E402

V = 6


def fake_denoiser(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Logits that depend on the whole input (so a reveal flag changes them): a fixed random map."""
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(V + 2, V + 2, generator=gen)
    h = table[z.clamp(max=V + 1)]
    return h + 0.3 * h.roll(1, dims=1) - 0.2 * h.roll(-1, dims=1)


def test_sampler_copy_equals_the_product_sampler_and_records_reveal_steps():
    sched = get_schedule("loglinear", 1e-3)
    ref = ancestral_sample(fake_denoiser, 5, 12, 4, V, sched, seed=3, temperature=0.9, batch_size=2)
    when: list = []
    mine, nfe, _ = reveal_aware.reveal_aware_sample(fake_denoiser, 5, 12, 4, V, sched, 3, 0.9, 2, None, when)
    assert torch.equal(ref.tokens, mine) and nfe == ref.nfe
    steps = torch.cat(when)
    assert steps.shape == (5, 12) and int(steps.min()) >= 0 and int(steps.max()) <= 4
    flagged, _, _ = reveal_aware.reveal_aware_sample(fake_denoiser, 5, 12, 4, V, sched, 3, 0.9, 2, V + 1)
    assert not torch.equal(flagged, mine), "the reveal flag must reach the network"


def test_cluster_ranks_by_hand():
    reveal = torch.tensor([[0, 1, 1, 0, 0, 1, 0, 1, 0, 0, 0, 1]], dtype=torch.bool)
    rank, last = reveal_aware.cluster_ranks(reveal, reach=2)
    assert rank.tolist() == [[-1, 0, 1, -1, -1, 0, -1, 1, -1, -1, -1, 0]]
    assert last.int().tolist() == [[0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 1]]
    rank1, _ = reveal_aware.cluster_ranks(reveal, reach=1)
    assert rank1[0, 7] == 0  # two apart is not a cluster at reach 1


def test_coordinated_targets_greedy_first_then_conditional():
    mask = V
    z_t = torch.tensor([[mask, mask, 2, mask]])
    reveal = torch.tensor([[1, 1, 0, 1]], dtype=torch.bool)
    calls = []

    def teacher(z, t):
        calls.append(z.clone())
        return fake_denoiser(z, t)

    target = reveal_aware.coordinated_targets(teacher, z_t, reveal, torch.zeros(1), V, 1.0, reach=2)
    first = torch.log_softmax(fake_denoiser(z_t, None)[..., :V], -1)
    g = int(first[0, 0].argmax())
    assert torch.equal(target[0, 0], torch.nn.functional.one_hot(torch.tensor(g), V).float())
    filled = z_t.clone()
    filled[0, 0] = g
    second = torch.log_softmax(fake_denoiser(filled, None)[..., :V], -1)
    # position 3 is within reach of position 1, so {0, 1, 3} is one cluster: 1 is greedy too, 3 is last
    g1 = int(second[0, 1].argmax())
    assert torch.equal(target[0, 1], torch.nn.functional.one_hot(torch.tensor(g1), V).float())
    filled[0, 1] = g1
    third = torch.log_softmax(fake_denoiser(filled, None)[..., :V], -1).exp()
    # tolerance: allclose defaults; the same float64 row selected two ways (exact)
    assert torch.allclose(target[0, 3], third[0, 3])
    assert len(calls) == 3 and torch.equal(calls[2], filled)
    assert torch.allclose(target[0, 2], torch.zeros(V))  # not revealed: no target
