"""Exact posterior sampling from the chain (mcd_scale/eval/chain_posterior.py) against enumeration."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from mcd_scale.eval.chain_posterior import sample_posterior
from mcd_scale.eval.synthetic import MarkovChain2
from mcd_scale.eval.synthetic import SwitchingChain
from mcd_scale.rng import keyed_uniform


def _chain() -> MarkovChain2:
    # S = 3 with a large leak: every completion has a probability the draws can resolve.
    return MarkovChain2(3, branching=2, seed=4, fanout=2, concentration=0.7, floor=3e-2)


def _switching() -> SwitchingChain:
    # S = 4, H = 2 (blocks {0, 1} and {2, 3}), a regime switch every ~5 tokens and a large leak.
    return SwitchingChain(4, regimes=2, seed=1, fanout=2, switch_prob=0.2, floor=3e-2)


@pytest.mark.parametrize("source, evidence", [
    ("chain2", (3, 3, 3, 3, 3)), ("chain2", (3, 1, 3, 3, 0)), ("chain2", (2, 3, 3, 1, 3)),
    ("switching", (4, 4, 4, 4, 4)), ("switching", (4, 1, 4, 4, 2)), ("switching", (0, 4, 4, 4, 3))])
def test_draws_follow_the_exact_posterior(source, evidence):
    """Chi-square of N draws against the enumerated posterior over all completions (df = cells - 1),
    refused at the 1e-6 tail: a correct sampler fails it once in a million runs; the draws are keyed,
    so the outcome is fixed. Also TV < 0.5 sqrt(cells / N) * 3 (three times the expected TV bound).
    The switching source's posterior sums over the hidden regime path (its log_prob is the forward algorithm)."""
    chain = _chain() if source == "chain2" else _switching()
    L, n = len(evidence), 30000
    S = chain.num_symbols
    z1 = torch.tensor(evidence)
    seqs = np.array(list(itertools.product(range(S), repeat=L)), dtype=np.int64)
    keep = np.all((z1.numpy() == S) | (seqs == z1.numpy()), axis=1)
    prob = np.exp(-chain.nll(seqs) * L) * keep
    prob = prob[keep] / prob[keep].sum()
    cells = seqs[keep]
    x = sample_posterior(chain, z1.expand(n, L), keyed_uniform("test-posterior", (L, int(keep.sum())), (n, L)),
                         chunk=4096)
    revealed = z1 != S
    assert bool((x[:, revealed] == z1[revealed]).all())
    codes = (x.numpy() * S ** np.arange(L - 1, -1, -1)).sum(1)
    cell_codes = (cells * S ** np.arange(L - 1, -1, -1)).sum(1)
    counts = np.array([(codes == c).sum() for c in cell_codes])
    assert counts.sum() == n                                   # no draw outside the evidence
    stat = ((counts - n * prob) ** 2 / (n * prob)).sum()
    assert stat < chi2.ppf(1 - 1e-6, len(cells) - 1), (stat, len(cells))
    assert 0.5 * np.abs(counts / n - prob).sum() < 1.5 * np.sqrt(len(cells) / n)


def test_rows_are_independent_of_batch_neighbours_and_bad_input():
    chain = _chain()
    z = torch.tensor([[3, 3, 1, 3], [0, 3, 3, 3], [3, 3, 3, 3]])
    u = keyed_uniform("test-posterior-rows", (0,), (3, 4))
    whole = sample_posterior(chain, z, u, chunk=3)
    alone = torch.cat([sample_posterior(chain, z[i:i + 1], u[i:i + 1]) for i in range(3)])
    assert torch.equal(whole, alone)
    with pytest.raises(ValueError, match="uniforms"):
        sample_posterior(chain, z, u[:, :3])
    with pytest.raises(ValueError, match="outside"):
        sample_posterior(chain, torch.full((1, 4), 7), u[:1])
